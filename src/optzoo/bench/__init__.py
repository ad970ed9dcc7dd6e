"""``python -m optzoo.bench``: every optimizer's step time and effective bandwidth, against its peers.

In one process: an in-place triad (``a += s*b``) as the machine's bandwidth roofline, then per workload
(:mod:`optzoo.bench.workloads`) torch's fused Adam as the reference, the torch.optim peers
(:mod:`optzoo.bench.peers`) and every optzoo optimizer through its torch face
(``optzoo.torch.create(name, params, fused=...)``) in each requested ``fused`` mode; MXNet 1.9.1 runs the
same workloads in a subprocess when its Python is found. Each measurement: gradients set once, the first
``step()`` timed alone (state creation; compilation for ``fused=True``), ``--warmup`` untimed steps,
then the median of up to ``--repeat`` timed steps (see :func:`optzoo.bench.timing.time_steps` for how
``--budget`` bounds slow ones). Results: a table on stdout, ``latest.json`` and ``latest.md`` under ``--out``.
The ``loaded`` workload runs with a busy process on every core (:mod:`optzoo.bench.load`); ``scheduled`` steps a
``LambdaLR`` after every step of both sides (a new lr each step); ``embedding`` times
lazy steps on a row-sparse gradient against the dense step and torch's sparse optimizers
(:mod:`optzoo.bench.sparse`); ``--first-call``
times each optimizer's first step in fresh processes instead, cold and warm (:mod:`optzoo.bench.first_call`).
Everything goes through public entry points: ``optzoo.torch.create(...)`` and ``opt.step()``.

    python -m optzoo.bench                                  # everything, full size (9 min on 2 cores)
    python -m optzoo.bench --workloads single --optimizers adam,sgd:momentum=0.5 --fused none,true,false
    python -m optzoo.bench --scale 1e-3 --no-peers --mxnet none --out /tmp/bench
    python -m optzoo.bench --workloads loaded --optimizers adam,sgd          # the shared machine
    python -m optzoo.bench --workloads scheduled --optimizers adam,lamb      # a new lr at every step
    python -m optzoo.bench --workloads embedding --mxnet none               # lazy steps on a 10M x 64 table
    python -m optzoo.bench --first-call --optimizers adam,lamb                # compilation, cold and warm
    python -m optzoo.bench --device cuda --workloads single --mxnet none
"""
from __future__ import annotations

import argparse
import ast
import datetime
import gc
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from .. import torch as _face
from ..optimizer import registry
from . import first_call as _first_call
from . import peers as _peers
from . import sparse as _sparse
from .load import busy_cores
from .report import evaluate_targets, mode_name, text_report, update_readme, write_results
from ._steps import time_paired
from .timing import (copy_bandwidth, device_info, device_sync, load_average, machine_info, settle_heap, synced,
                     time_steps, triad)
from .workloads import WORKLOADS, bytes_moved, bytes_per_element, make_workload, param_shape, settings_for

__all__ = ["main", "run", "parse_args"]

_MODES = {"none": None, "true": True, "false": False}
#: every ``--workloads`` key: the dense ones (:mod:`optzoo.bench.workloads`), then the row-sparse embedding
_KEYS = WORKLOADS + (_sparse.KEY,)
_ROOT = Path(__file__).resolve().parents[3]


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m optzoo.bench", description=__doc__.splitlines()[0].strip("`: "),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", default=",".join(_KEYS), help=f"comma-separated, of {', '.join(_KEYS)}")
    p.add_argument("--optimizers", default=None,
                   help="comma-separated registered names, each optionally name:key=value[:key=value] "
                        "(MXNet hyperparameter names); default: every registered optimizer")
    p.add_argument("--fused", default="none,true", help="comma-separated fused modes of none, true, false")
    p.add_argument("--loaded-fused", default="none", help="the fused modes measured on the loaded workload "
                                                          "(default: none, the default path)")
    p.add_argument("--load-processes", type=int, default=None, help="busy processes for the loaded workload "
                                                                    "(default: os.cpu_count())")
    p.add_argument("--device", default="cpu", help="torch device to measure on, e.g. cpu or cuda (default cpu)")
    p.add_argument("--first-call", nargs="?", const="float32", default=None, metavar="DTYPES",
                   help="measure only each optimizer's first step(), in fresh processes: cold (empty inductor "
                        "cache) and warm (that cache again); DTYPES: comma-separated float32, float16 "
                        "(multi_precision), default float32")
    p.add_argument("--scale", type=float, default=1.0, help="fraction of the full workload sizes (0, 1]")
    p.add_argument("--repeat", type=int, default=10, help="timed steps per measurement, at most")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps after the first call")
    p.add_argument("--budget", type=float, default=1.0, help="seconds of timed steps per measurement, about")
    p.add_argument("--tries", type=int, default=1, help="measurements per row, each on freshly allocated "
                                                        "weights and states; the fastest is reported")
    p.add_argument("--out", default=None, help="directory for latest.json and latest.md (default: bench/results for "
                                                "the full run, bench/results/partial for any other)")
    p.add_argument("--readme", default=None, help="also put the latest table into this markdown file, between "
                                                   "its <!-- bench:latest:start/end --> markers")
    p.add_argument("--render", default=None, metavar="JSON",
                   help="measure nothing: write the reports (stdout, --out, --readme) from a saved latest.json")
    p.add_argument("--no-peers", action="store_true", help="skip torch.optim / pytorch-optimizer / MXNet peers "
                                                           "(torch's fused Adam is still measured)")
    p.add_argument("--mxnet", default="auto", help="MXNet 1.9.1's python: a path, 'auto' (.mxref/bin/python "
                                                    "if present) or 'none'")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args.workload_keys = [w.strip() for w in args.workloads.split(",") if w.strip()]
        for key in args.workload_keys:
            if key not in _KEYS:
                raise ValueError(f"--workloads: {key!r} is unknown: expected some of {', '.join(_KEYS)}")
        args.modes = _parse_modes(args.fused, "--fused")
        args.loaded_modes = _parse_modes(args.loaded_fused, "--loaded-fused")
        if args.load_processes is not None and args.load_processes < 0:
            raise ValueError(f"--load-processes {args.load_processes} is invalid: expected >= 0")
        args.device = _device(args.device)
        args.first_call_dtypes = (None if args.first_call is None
                                  else _first_call.parse_dtypes(args.first_call))
        args.specs = parse_optimizers(args.optimizers)
        if args.threads is not None and args.threads < 1:
            raise ValueError(f"--threads {args.threads} is invalid: expected >= 1")
        if args.repeat < 1 or args.warmup < 0 or not (math.isfinite(args.budget) and args.budget >= 0):
            raise ValueError(f"--repeat {args.repeat} / --warmup {args.warmup} / --budget {args.budget} is invalid: "
                             "expected repeat >= 1, warmup >= 0, a finite budget >= 0")
        if args.tries < 1:
            raise ValueError(f"--tries {args.tries} is invalid: expected >= 1")
        if not math.isfinite(args.scale):
            raise ValueError(f"--scale {args.scale} is invalid: expected a fraction in (0, 1]")
        make_workload("single", args.scale)  # validates --scale
        if args.readme and not Path(args.readme).is_file():
            raise ValueError(f"--readme {args.readme!r}: no such file")
        args.rendered = None if args.render is None else _read_results(args.render)
    except ValueError as exc:
        p.error(str(exc))
    if args.out is None:  # a partial run never overwrites the committed full results
        full = all(str(getattr(args, k)) == str(p.get_default(k))  # str: --device is a torch.device by now
                   for k in ("workloads", "optimizers", "fused", "scale", "loaded_fused", "device"))
        args.out = "bench/results" if full or args.render else "bench/results/partial"
    return args


def _parse_modes(text, option):
    modes = []
    for m in (m.strip().lower() for m in text.split(",")):
        if m and m not in _MODES:
            raise ValueError(f"{option}: {m!r} is invalid: expected none, true or false")
        if m:
            modes.append(_MODES[m])
    return modes


def _device(text):
    try:
        device = torch.device(text)
        torch.zeros(1, device=device)
        device_sync(device)
    except (RuntimeError, ValueError, AssertionError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"--device {text!r} is not usable here ({first}): expected cpu or an available "
                         "device such as cuda") from None
    if device.type == "meta":
        raise ValueError(f"--device {text!r} is invalid: expected a device that holds data, e.g. cpu or cuda")
    return device


def parse_optimizers(text) -> list:
    """``[(label, canonical name, hyperparameter overrides)]`` from ``name[:key=value...],...``."""
    if text is None:
        return [(name, name, {}) for name in registry.list_optimizers()]
    specs = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        name, *pairs = item.split(":")
        overrides = {}
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep:
                raise ValueError(f"--optimizers: {pair!r} in {item!r} is invalid: expected key=value")
            try:
                overrides[key] = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                overrides[key] = value
        canonical = registry.get_record(name).name
        try:  # the hyperparameters pass the constructor's checks now, not after measuring has started
            registry.create(canonical, **overrides)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"--optimizers: {item!r} is invalid: {exc}") from None
        specs.append((item, canonical, overrides))
    return specs


def _read_results(path):
    """The saved ``latest.json`` that ``--render`` names, read (and checked) before anything is written."""
    try:
        results = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ValueError(f"--render {path!r}: cannot be read ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise ValueError(f"--render {path!r}: not JSON ({exc})") from None
    if not isinstance(results, dict) or not str(results.get("schema", "")).startswith("optzoo.bench/"):
        raise ValueError(f"--render {path!r}: not a benchmark result (latest.json of python -m optzoo.bench)")
    return results


class _Data:
    """One workload's weights and gradients, made once; each measurement gets fresh weight copies."""

    def __init__(self, workload, seed, device="cpu"):
        gen = torch.Generator().manual_seed(seed)  # drawn on the CPU: the same numbers on every device
        self.weights = [torch.randn(s, generator=gen).to(device, workload.dtype) for s in workload.shapes]
        self.grads = [torch.randn(s, generator=gen).to(device, workload.dtype) for s in workload.shapes]

    def params(self, shapes=None):
        out = []
        for k, (w, g) in enumerate(zip(self.weights, self.grads)):
            shape = shapes[k] if shapes else w.shape
            p = torch.nn.Parameter(w.reshape(shape).clone())
            p.grad = g.reshape(shape)
            out.append(p)
        return out


class _Scheduled:
    """An optimizer stepped with a ``LambdaLR`` after it (a warm-up over 100 steps, then a slow decay: a new lr
    at every step, as the Hugging Face Trainer's and most training loops' schedules give); the rest is the
    optimizer's."""

    def __init__(self, opt):
        self.opt = opt
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, (k + 1) / 100) * 0.9999 ** k)

    def step(self):
        self.opt.step()
        self.scheduler.step()

    def __getattr__(self, name):
        return getattr(self.opt, name)


def _with_scheduler(make):
    return lambda ps: _Scheduled(make(ps))


def _measure(make, new_params, args, ref=None, scheduled=False) -> dict:
    """Build an optimizer over ``new_params()`` and time its ``step()``, ``--tries`` times on fresh
    allocations; the fastest try is kept (``tries_ms`` lists them all). Errors are reported, not raised.

    Why tries: on this kind of machine the same kernel over a 16M-element tensor runs at two speeds
    depending on where the fresh weights and states land in memory (torch's fused Adam measured 6.9 and
    4.1 ms on consecutive allocations); every optimizer, peer and baseline gets the same chances.

    ``ref``: the reference's ``(make, new_params)`` (torch's fused Adam): its step is timed right before
    each timed step (:func:`~optzoo.bench._steps.time_paired`), which adds ``ref_ms`` and ``ratio``.

    On a device with asynchronous kernels (CUDA) every timed call ends by synchronizing the device, and
    the device is synchronized before the first one, so each time is the step's whole work."""
    best, runs = None, []
    if scheduled:  # both sides with their scheduler (the "scheduled" workload)
        make = _with_scheduler(make)
        ref = None if ref is None else (_with_scheduler(ref[0]), ref[1])
    sync = device_sync(args.device)
    for _ in range(max(1, args.tries)):
        params = new_params()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                opt = make(params)
                if ref is None:
                    if sync:
                        sync()
                    result = dict(time_steps(synced(opt.step, sync), repeat=args.repeat, warmup=args.warmup,
                                             budget=args.budget))
                else:
                    ref_opt = ref[0](ref[1]())
                    if sync:
                        sync()
                    result = dict(time_paired(synced(opt.step, sync), synced(ref_opt.step, sync),
                                              repeat=args.repeat, warmup=args.warmup, budget=args.budget))
                    del ref_opt
            result["finite"] = all(bool(torch.isfinite(p).all()) for p in params)
        except Exception as exc:  # a mode or optimizer that cannot run: report it, go on
            return {"error": f"{type(exc).__name__}: {exc}"[:300]}
        runs.append(result["ms"])
        if best is None or _score(result) < _score(best):
            if best is not None:
                result["first_ms"] = best["first_ms"]  # the first call of the first try: compilation included
            best, result["_opt"] = result, opt
        del opt, params
    best["tries_ms"] = runs
    return best


_T0 = [time.perf_counter()]


def _collect(workload):
    """Free the last measurement's cycles when they hold much memory (a full collection costs ~0.1 s)."""
    if workload.numel >= 1 << 20:
        gc.collect()


def _log(args, text):
    if not args.quiet:
        print(f"[{time.perf_counter() - _T0[0]:6.1f} s] {text}", file=sys.stderr, flush=True)


def _score(result):
    """What "faster" means between tries and peer variants: the paired ratio where there is one."""
    return result.get("ratio", result["ms"])


def _adam(ps):
    return torch.optim.Adam(ps, lr=1e-3, fused=True)


def _baseline(data, workload, args) -> dict:
    r = _measure(_adam, data.params, args, scheduled=workload.scheduled)
    if "_opt" in r:
        r["bytes"] = _peers.torch_bytes_moved(r.pop("_opt"))
        r["bytes_per_element"] = r["bytes"] / workload.numel
        r["gbps"] = r["bytes"] / r["ms"] / 1e6
    return r


def _control(data, workload, args):
    """torch's fused Adam paired against another instance of itself (the same code on other allocations): the
    ratio an ideal row would get. How far it lies from 1 is the pairing's own spread on this machine, as where
    the weights and states land in memory moves a step's time (0.82-1.07x measured on 2 cores)."""
    r = _measure(_adam, data.params, args, ref=(_adam, data.params), scheduled=workload.scheduled)
    return r.get("ratio")


def _measure_peers(data, workload, args) -> list:
    out = []
    for label, name, overrides in args.specs:
        settings = settings_for(name, overrides)
        for find in (_peers.torch_peer, _peers.pytorch_optimizer_peer):
            peer = find(name, settings)
            if peer is None:
                continue
            entry = {"optimizer": label, "workload": workload.key, "library": peer.library, "class": peer.name,
                     "kwargs": peer.kwargs, "math": peer.math, "variants": {}}
            best = None
            for variant in _peers.variants(peer.cls):
                vname = _peers.variant_name(variant)
                r = _measure(lambda ps: peer.cls(ps, **peer.kwargs, **variant), data.params, args,
                             ref=(_adam, data.params))
                opt = r.pop("_opt", None)
                entry["variants"][vname] = r.get("ms", r.get("error"))
                if "ms" in r and (best is None or _score(r) < _score(best[1])):
                    r["bytes"] = _peers.torch_bytes_moved(opt)
                    best = (vname, r)
                del opt
            if best is None:
                entry["error"] = "; ".join(f"{k}: {v}" for k, v in entry["variants"].items())
            else:
                entry["variant"] = best[0]
                entry.update(best[1])
                entry["gbps"] = entry["bytes"] / entry["ms"] / 1e6
            entry.setdefault("variant", "-")
            out.append(entry)
            _log(args, f"  peer {label:<14} {entry['class']:<9} {entry['variant']:<8} "
                       f"{entry['ms']:9.2f} ms" if "ms" in entry else f"  peer {label}: {entry['error']}")
            _collect(workload)
    return out


def _measure_optzoo(data, workload, args, baseline, peers, modes) -> list:
    rows = []
    for label, name, overrides in args.specs:
        settings = settings_for(name, overrides)
        moved = bytes_moved(name, workload, overrides)
        shapes = [param_shape(name, s) for s in workload.shapes]
        peer = next((p for p in peers if p["optimizer"] == label and p["library"] == "torch.optim"), None)
        for mode in modes:
            def make(ps, mode=mode):
                return _face.create(name, ps, fused=mode, multi_precision=workload.multi_precision, **settings)
            r = _measure(make, lambda: data.params(shapes), args, ref=(_adam, data.params),
                         scheduled=workload.scheduled)
            r.pop("_opt", None)
            row = {"optimizer": label, "name": name, "settings": settings, "workload": workload.key, "fused": mode,
                   "bytes": moved, "bytes_per_element": moved / workload.numel, **r}
            if "ms" in r:
                row["gbps"] = moved / r["ms"] / 1e6
                if "gbps" in baseline:  # from the paired ratio: both steps timed back to back
                    row["vs_adam_time"] = r["ratio"]
                    row["vs_adam_gbps"] = moved / baseline["bytes"] / r["ratio"]
                if peer and "ms" in peer:
                    row["peer"] = f"{peer['class']} ({peer['variant']})"
                    row["peer_ms"] = peer["ms"]
                    row["vs_peer"] = r["ratio"] / peer["ratio"]  # both against Adam timed beside them
            rows.append(row)
            _log(args, f"  optzoo {label:<14} fused={mode_name(mode):<5} "
                       + (f"{r['ms']:9.2f} ms  first {r['first_ms']:9.2f} ms  {row['gbps']:7.2f} GB/s"
                          if "ms" in r else r["error"]))
            _collect(workload)
    return rows


def _mxnet_python(args):
    if args.mxnet == "none":
        return None, "skipped (--mxnet none)"
    if args.mxnet != "auto":
        path = Path(args.mxnet)
        return (path, "") if path.exists() else (None, f"not found: {args.mxnet}")
    for root in (Path.cwd(), _ROOT):
        path = root / ".mxref" / "bin" / "python"
        if path.exists():
            return path, ""
    return None, "not found (.mxref/bin/python; see --mxnet)"


def _run_mxnet(args, workloads, rows) -> dict:
    if args.device.type != "cpu":
        return {"status": f"skipped (--device {args.device}: MXNet's side runs on the CPU)"}
    python, status = _mxnet_python(args)
    if python is None:
        return {"status": status}
    workloads = [w for w in workloads if not w.loaded and not w.scheduled]  # no load beside it, no scheduler
    if not workloads:
        return {"status": "skipped (no workload without load)"}
    jobs = [{"label": label, "name": name, "settings": settings_for(name, overrides), "workload": w.key,
             "shapes": [param_shape(name, s) for s in w.shapes], "dtype": w.dtype_name,
             "multi_precision": w.multi_precision}
            for w in workloads for label, name, overrides in args.specs]
    cfg = {"jobs": jobs, "repeat": args.repeat, "warmup": args.warmup, "budget": args.budget, "seed": args.seed}
    worker = Path(__file__).with_name("_mxnet_worker.py")
    _log(args, f"MXNet: {python}")
    tail = []
    try:
        # stdout (the JSON) to a file, stderr (progress) streamed: no pipe can fill up and block the worker
        with tempfile.TemporaryFile("w+") as stdout:
            proc = subprocess.Popen([str(python), str(worker)], stdin=subprocess.PIPE, stdout=stdout,
                                    stderr=subprocess.PIPE, text=True)
            proc.stdin.write(json.dumps(cfg))
            proc.stdin.close()
            for line in proc.stderr:
                tail = (tail + [line.rstrip()])[-5:]
                if not args.quiet:
                    sys.stderr.write(line)
            proc.wait()
            stdout.seek(0)
            text = stdout.read()
    except (OSError, subprocess.SubprocessError) as exc:
        return {"status": f"failed: {type(exc).__name__}: {exc}", "python": str(python)}
    if proc.returncode != 0:
        return {"status": f"failed (exit {proc.returncode}): {(tail or ['no output'])[-1][:300]}",
                "python": str(python)}
    out = json.loads(text)
    found = {(r["label"], r["workload"]): r for r in out["results"]}
    for row in rows:
        mx = found.get((row["optimizer"], row["workload"]))
        if mx is None:
            continue
        row["mxnet"] = mx
        if "ms" in mx and "ms" in row:
            row["mxnet_ms"] = mx["ms"]
            row["vs_mxnet"] = row["ms"] / mx["ms"]
    return {"status": "ok", "python": str(python), "version": out["version"], "results": out["results"]}


def run(args) -> dict:
    """Run the benchmark described by ``parse_args`` output; returns the results (see ``latest.json``)."""
    start = _T0[0] = time.perf_counter()
    # every contender then finds the heap a training process has (see timing.settle_heap), whatever ran first
    settle_heap()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    workloads = [make_workload(k, args.scale) for k in args.workload_keys if k != _sparse.KEY]
    triad_numel = make_workload("single", args.scale).numel
    results = {"schema": "optzoo.bench/1", "started": datetime.datetime.now().isoformat(timespec="seconds"),
               "machine": machine_info(), "device": device_info(args.device),
               "load_average": {"start": load_average()},
               "config": {"argv": args.argv, "workloads": args.workload_keys, "fused": args.modes,
                          "loaded_fused": args.loaded_modes, "load_processes": args.load_processes,
                          "optimizers": [s[0] for s in args.specs], "scale": args.scale, "repeat": args.repeat,
                          "tries": args.tries, "warmup": args.warmup, "budget": args.budget, "peers": not args.no_peers,
                          "threads": args.threads, "device": str(args.device),
                          "seed": args.seed},
               "pytorch_optimizer": _peers.pytorch_optimizer_status(),
               "bytes_per_element": {label: {"float32": bytes_per_element(name, settings=o),
                                             "float16_mp": bytes_per_element(name, torch.float16, True, settings=o)}
                                     for label, name, o in args.specs},
               "triad": {}, "workloads": {}, "rows": [], "peers": []}
    results["triad"]["start"] = triad(triad_numel, repeat=args.repeat, budget=args.budget, device=args.device)
    _log(args, f"triad: {results['triad']['start']['gbps']:.1f} GB/s")
    if args.device.type != "cpu":  # the device's own roofline: the triad on a GPU is launch-bound at small sizes
        results["copy"] = copy_bandwidth(args.device)
        _log(args, f"copy: {results['copy']['gbps']:.1f} GB/s")
    for w in workloads:
        _log(args, w.describe())
        data = _Data(w, args.seed, args.device)
        if w.loaded:
            entry, rows = _measure_loaded(data, w, args)
        else:
            entry, rows = _measure_workload(data, w, args)
        results["peers"] += entry.pop("peers")
        results["workloads"][w.key] = {"label": w.label, "describe": w.describe(), "tensors": len(w.shapes),
                                       "elements": w.numel, "dtype": w.dtype_name,
                                       "multi_precision": w.multi_precision, "scheduled": w.scheduled, **entry}
        results["rows"] += rows
        del data
        gc.collect()
    if _sparse.KEY in args.workload_keys:  # its own rows (lazy vs dense vs torch's sparse optimizers): no MXNet side
        results["embedding"] = _sparse.run(args, log=lambda text: _log(args, text))
    results["mxnet"] = {"status": "skipped (--no-peers)"} if args.no_peers else _run_mxnet(args, workloads,
                                                                                           results["rows"])
    results["triad"]["end"] = triad(triad_numel, repeat=args.repeat, budget=args.budget, device=args.device)
    results["load_average"]["end"] = load_average()
    results["targets"] = evaluate_targets(results["rows"] + results.get("embedding", {}).get("results", []))
    results["total_s"] = time.perf_counter() - start
    return results


def _measure_workload(data, w, args):
    """torch's fused Adam, the peers, fused Adam again, then every optzoo row in each ``--fused`` mode."""
    before = _baseline(data, w, args)
    peers = [] if args.no_peers or w.multi_precision or w.scheduled else _measure_peers(data, w, args)
    after = _baseline(data, w, args)
    # the faster of two measurements (before and after the peers): the stricter reference
    baseline = min((b for b in (before, after) if "ms" in b), key=lambda b: b["ms"], default=before)
    _log(args, f"  torch fused Adam {baseline.get('ms', float('nan')):9.2f} ms")
    control = _control(data, w, args)
    rows = _measure_optzoo(data, w, args, baseline, peers, args.modes)
    return {"baseline": baseline, "baseline_runs_ms": [b.get("ms") for b in (before, after)], "peers": peers,
            "control_ratio": control}, rows


def _measure_loaded(data, w, args):
    """The shared machine: fused Adam and every optzoo row in each ``--loaded-fused`` mode, all measured while
    one busy process per core spins (no peers: the reference is fused Adam under the same load, paired)."""
    n = (os.cpu_count() or 1) if args.load_processes is None else args.load_processes
    # bounded: every spinner stops by itself well after the longest this block can take at --budget
    limit = 600 + 60 * len(args.specs) * max(1, len(args.loaded_modes)) * max(1, args.tries) * (1 + args.budget)
    with busy_cores(n, limit_s=limit) as load:
        _log(args, f"  load: {load.alive()} of {n} busy processes spinning")
        before = _baseline(data, w, args)
        control = _control(data, w, args)
        rows = _measure_optzoo(data, w, args, before, [], args.loaded_modes)
        after = _baseline(data, w, args)
        alive = load.alive()
    baseline = min((b for b in (before, after) if "ms" in b), key=lambda b: b["ms"], default=before)
    _log(args, f"  torch fused Adam under load {baseline.get('ms', float('nan')):9.2f} ms")
    load_entry = {"processes": n, "spinning_at_end": alive, "limit_s": limit}
    return {"baseline": baseline, "baseline_runs_ms": [b.get("ms") for b in (before, after)], "load": load_entry,
            "fused": args.loaded_modes, "peers": [], "control_ratio": control}, rows


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.first_call is not None and not args.render:
        results = _first_call.run(args, log=lambda text: _log(args, text))
        json_path, md_path = _first_call.write(results, args.out)
        print(_first_call.text_report(results))
        print(f"wrote {json_path} and {md_path}")
        return 0
    if args.render:
        results = args.rendered
    else:
        results = run(args)
    json_path, md_path = write_results(results, args.out)
    print(text_report(results))
    print(f"wrote {json_path} and {md_path}")
    if args.readme:
        update_readme(args.readme, results)
        print(f"updated {args.readme}")
    return 0
