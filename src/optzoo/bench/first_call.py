"""``python -m optzoo.bench --first-call``: what each optimizer's first ``step()`` costs, cold and warm.

For every optimizer, ``--fused`` mode and dtype (``float32``; ``float16`` with ``multi_precision=True``),
two fresh processes (``_first_call_worker.py``) each build ``optzoo.torch.create(name, params, ...)``
over :data:`TENSORS` tensors of 512 x 512 (each 1/64 of workload (i), times ``--scale``): the executor runs
large tensors four per compiled call, a last, shorter group filled up with small stand-ins, so a first step
compiles the group graph, as a model with many large tensors does. Each process times its first ``step()``:

- cold: an empty inductor cache (``TORCHINDUCTOR_CACHE_DIR`` and ``TRITON_CACHE_DIR`` set to a fresh
  temporary folder in that process's environment only), so ``fused=True`` compiles from scratch;
- warm: a second fresh process with that same folder, as a training job's next start finds it.

Both include what the optimizer's first step pays (dynamo's tracing, inductor's compilation or cache
lookup, state creation). Timed apart, as costs of the process rather than of an optimizer: the imports of
torch and optzoo, and the compiler's one-time start-up (importing inductor, probing the CPU, the toolchain's
first run), measured on a trivial ``torch.compile`` before the optimizer is built. The targets, per optimizer
and dtype: a first call <= 10 s cold and <= 1 s warm. Results: a table on stdout, ``first_call.json`` and ``first_call.md``
under ``--out``. On 2 cores a process takes 3-5 s for ``fused=None`` (mostly importing torch) and 15-30 s cold
for ``fused=True``: every optimizer in both modes, about 10 minutes.
"""
from __future__ import annotations

import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .report import _f, mode_name
from .timing import device_info, machine_info
from .workloads import make_workload, param_shape, settings_for

__all__ = ["DTYPES", "TARGETS", "parse_dtypes", "run", "text_report", "markdown_report", "write"]

#: dtype name -> (torch dtype name, multi_precision)
DTYPES = {"float32": ("float32", False), "float16": ("float16", True)}
#: seconds: the issue's bounds on a first call, cold and warm
TARGETS = {"cold": 10.0, "warm": 1.0}
TIMEOUT_S = 300
#: tensors per first call: one compiled group of four, and one more (a group of its own, filled up with stand-ins)
TENSORS = 5
_WORKER = Path(__file__).with_name("_first_call_worker.py")


def parse_dtypes(text) -> list:
    dtypes = [d.strip().lower() for d in text.split(",") if d.strip()]
    bad = [d for d in dtypes if d not in DTYPES]
    if bad or not dtypes:
        raise ValueError(f"--first-call: {text!r} is invalid: expected comma-separated {', '.join(DTYPES)}")
    return dtypes


def _env(cache):
    """The parent's environment with its own inductor and triton caches, and this optzoo importable."""
    import optzoo
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(cache), TRITON_CACHE_DIR=str(Path(cache) / "triton"))
    src = str(Path(optzoo.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    return env


def _spawn(job, env) -> dict:
    try:
        proc = subprocess.run([sys.executable, str(_WORKER), json.dumps(job)], env=env, capture_output=True,
                              text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {TIMEOUT_S} s"}
    if proc.returncode != 0:
        tail = [line for line in proc.stderr.strip().splitlines() if line.strip()] or ["no output"]
        return {"error": f"exit {proc.returncode}: {tail[-1][:300]}"}
    return json.loads(proc.stdout)


def run(args, log=lambda text: None) -> dict:
    """Cold and warm first calls for every ``args.specs`` x ``args.modes`` x ``args.first_call_dtypes``."""
    start = time.perf_counter()
    shape = make_workload("single", args.scale / 64).shapes[0]
    rows = []
    for label, name, overrides in args.specs:
        settings = settings_for(name, overrides)
        for dtype in args.first_call_dtypes:
            torch_dtype, multi_precision = DTYPES[dtype]
            for mode in args.modes:
                job = {"name": name, "settings": settings, "fused": mode, "dtype": torch_dtype,
                       "multi_precision": multi_precision, "shape": list(param_shape(name, shape)), "tensors": TENSORS,
                       "device": str(args.device), "seed": args.seed, "threads": args.threads}
                cache = tempfile.mkdtemp(prefix="optzoo-first-call-")
                try:
                    env = _env(cache)
                    cold = _spawn(job, env)
                    warm = _spawn(job, env)
                finally:
                    shutil.rmtree(cache, ignore_errors=True)
                row = {"optimizer": label, "name": name, "fused": mode, "dtype": dtype, "shape": job["shape"],
                       "cold": cold, "warm": warm}
                for key in ("cold", "warm"):
                    if "first_s" in row[key]:
                        row[f"{key}_s"] = row[key]["first_s"]
                        row[f"{key}_met"] = row[key]["first_s"] <= TARGETS[key]
                rows.append(row)
                log(f"  first call {label:<14} {dtype:<7} fused={mode_name(mode):<5} "
                    + "  ".join(f"{k} {row[f'{k}_s']:7.2f} s" if f"{k}_s" in row else f"{k}: {row[k]['error']}"
                                for k in ("cold", "warm")))
    checks = [(r, k) for r in rows for k in TARGETS]
    return {"schema": "optzoo.bench.first_call/1",
            "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "machine": machine_info(), "device": device_info(args.device),
            "config": {"argv": args.argv, "optimizers": [s[0] for s in args.specs], "fused": args.modes,
                       "dtypes": args.first_call_dtypes, "scale": args.scale, "tensors": TENSORS,
                       "elements": TENSORS * shape[0] * shape[1],
                       "threads": args.threads, "device": str(args.device), "seed": args.seed},
            "targets": {"limits_s": TARGETS, "checks": len(checks),
                        "met": sum(bool(r.get(f"{k}_met")) for r, k in checks),
                        "misses": [{"optimizer": r["optimizer"], "fused": r["fused"], "dtype": r["dtype"], "kind": k,
                                    "value": r.get(f"{k}_s")} for r, k in checks if not r.get(f"{k}_met")]},
            "rows": rows, "total_s": time.perf_counter() - start}


def _table(results):
    head = ["optimizer", "fused", "dtype", "cold s", "warm s", "2nd step ms (cold run)", "import s (cold run)",
            "compiler start-up s (cold / warm run)"]
    body = []
    for r in results["rows"]:
        cells = [r["optimizer"], mode_name(r["fused"]), r["dtype"]]
        for key in ("cold", "warm"):
            cells.append(_f(r[f"{key}_s"]) + ("" if r[f"{key}_met"] else " (miss)") if f"{key}_s" in r
                         else "error: " + r[key]["error"][:80])
        cells += [_f(r["cold"]["second_s"] * 1e3) if "second_s" in r["cold"] else "-",
                  _f(r["cold"]["import_s"]) if "import_s" in r["cold"] else "-",
                  " / ".join(_f(r[k]["startup_s"]) if "startup_s" in r[k] else "-" for k in ("cold", "warm"))]
        body.append(cells)
    return head, body


def _summary(results):
    t, c = results["targets"], results["config"]
    limits = results["targets"]["limits_s"]
    n = c.get("tensors", 1)
    what = f"{n} tensors of {c['elements'] // n:,} elements" if n > 1 else f"one {c['elements']:,}-element tensor"
    return (f"first call of optzoo.torch.create(name, [{what}]).step() in a fresh "
            f"process on {c['device']}, after the process's one-time compiler start-up (a trivial torch.compile, "
            f"its own column): cold = empty inductor cache, warm = the same cache again; targets "
            f"cold <= {limits['cold']:g} s, warm <= {limits['warm']:g} s: {t['met']} of {t['checks']} met")


def text_report(results) -> str:
    m = results["machine"]
    head, body = _table(results)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    out = [f"optzoo first calls  {m['cpu']}, {m['cores']} cores, torch {m['torch']}", _summary(results), ""]
    for line in [head] + body:
        out.append("  " + "  ".join(str(x).ljust(wd) if i in (0, 2) else str(x).rjust(wd)
                                     for i, (x, wd) in enumerate(zip(line, widths))))
    out.append(f"total run time: {results['total_s']:.0f} s")
    return "\n".join(out)


def markdown_report(results) -> str:
    m = results["machine"]
    head, body = _table(results)
    out = ["# optzoo benchmark: first calls", "",
           f"`python -m optzoo.bench {' '.join(results['config']['argv'])}`", "",
           f"- machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, Python {m['python']}, "
           f"optzoo {m['optzoo']} ({m['git'] or 'no git'}), {results['started']}",
           f"- total run time: {results['total_s']:.0f} s", f"- {_summary(results)}", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(str(x) for x in line) + " |" for line in body]
    return "\n".join(out) + "\n"


def write(results, out_dir) -> tuple:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "first_call.json", out / "first_call.md"
    json_path.write_text(json.dumps(results, indent=1) + "\n")
    md_path.write_text(markdown_report(results))
    return json_path, md_path
