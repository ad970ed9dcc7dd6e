"""The ``optzoo`` command line: ``optzoo demo``, ``optzoo list``, ``optzoo bench``, ``optzoo import-mxnet``.

    optzoo demo [--optimizers sgd,nag,adam] [--epochs 20] [--seed 0] [--out demo-out] [--device cpu] [--fused]
    optzoo list
    optzoo bench [arguments of python -m optzoo.bench]
    optzoo import-mxnet PARAMS [STATES] --out ckpt.pt [--states-out ckpt.states] [--order sorted|file]

Bad arguments end with a message naming the argument and exit status 2 (no traceback).
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
from pathlib import Path

from . import optimizer

__all__ = ["main", "build_parser"]

_FUSED = {"none": None, "true": True, "false": False}
_DEMO_EXTRA = ("optzoo demo needs matplotlib, pillow and rich (the 'demo' extra): pip install 'optzoo[demo]' "
               "(from a source checkout: pip install '.[demo]')")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="optzoo", description="MXNet 1.9.1's optimizers on PyTorch tensors.")
    sub = p.add_subparsers(dest="command", metavar="{demo,list,bench,import-mxnet}")
    demo = sub.add_parser("demo", help="train a small network on the 8x8 digits with every optimizer, and a "
                                       "click-through model with row-sparse gradients; tables and pictures",
                          description="Train a 64-64-10 MLP on the 8x8 digits (shipped with optzoo) with each "
                                      "optimizer through optzoo.Trainer, then a hashed-embedding click-through "
                                      "model on generated data with FTRL, Adam and AdaGrad, sparse against dense "
                                      "gradients; print tables and write PNGs.")
    demo.add_argument("--optimizers", default=None, metavar="NAMES",
                      help="comma-separated registered names (default: all; see `optzoo list`)")
    demo.add_argument("--epochs", default="20", metavar="N", help="passes over the training images (default 20)")
    demo.add_argument("--batch-size", default="32", metavar="N", help="images per step (default 32)")
    demo.add_argument("--seed", default="0", metavar="N", help="initial weights, split and batch order (default 0)")
    demo.add_argument("--out", default="demo-out", metavar="DIR", help="where the PNGs and tables go "
                                                                       "(default demo-out)")
    demo.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    demo.add_argument("--fused", nargs="?", const="true", default="none", metavar="{none,true,false}",
                      help="the Trainer's fused argument: none (default: the fast path), true (every update compiled; "
                           "the same as a bare --fused), false (one update per parameter)")
    demo.add_argument("--trajectory-steps", default=None, metavar="N",
                      help="updates per 2-D trajectory (default: per function, 60 to 1000)")
    demo.set_defaults(parser=demo)
    sub.add_parser("list", help="every registered optimizer, its description and default hyperparameters")
    sub.add_parser("bench", help="the benchmark: python -m optzoo.bench (`optzoo bench --help`)", add_help=False)
    imp = sub.add_parser("import-mxnet", help="convert an MXNet 1.9.1 checkpoint (params, trainer states) to "
                                              "optzoo's files, without MXNet",
                         description="Read an MXNet 1.9.1 params file (save_parameters, export's -0000.params or "
                                     "mx.nd.save) and, optionally, a gluon.Trainer.save_states file (read without "
                                     "running code); write the weights as a torch state_dict and the states as an "
                                     "optzoo.Trainer.save_states file. See docs/porting-from-mxnet.md.")
    imp.add_argument("params", metavar="PARAMS", help="the MXNet params file")
    imp.add_argument("states", metavar="STATES", nargs="?", default=None,
                     help="the MXNet trainer states file (Trainer.save_states), optional")
    imp.add_argument("--out", required=True, metavar="PATH",
                     help="where the weights go: a torch state_dict (torch.load(PATH, weights_only=True))")
    imp.add_argument("--states-out", default=None, metavar="PATH",
                     help="where the trainer states go (optzoo.Trainer.load_states); default: --out with the "
                          "suffix .states")
    imp.add_argument("--order", default="sorted", choices=("sorted", "file"),
                     help="the parameters' order in MXNet's Trainer: sorted by name (default: Gluon's order for "
                          "net.collect_params()) or the params file's order")
    imp.set_defaults(parser=imp)
    return p


#: The largest seed torch's generators take (``manual_seed`` raises a bare RuntimeError beyond it).
_MAX_SEED = 2**64 - 1
#: Any other count: beyond this it is a typo, not a run (and Python ints would reach torch unbounded).
_MAX_INT = 2**31 - 1


def _int(parser, flag, text, low, high=_MAX_INT):
    try:
        value = int(text)
    except ValueError:
        parser.error(f"{flag}={text!r}: expected an integer in [{low}, {high}]")
    if not low <= value <= high:
        parser.error(f"{flag}={value}: expected an integer in [{low}, {high}]")
    return value


def _optimizers(parser, text):
    known = optimizer.list_optimizers()
    if text is None:
        return known
    names = []
    for n in (n.strip() for n in text.split(",")):
        if not n:
            continue
        try:
            canonical = optimizer.get_record(n).name
        except (ValueError, TypeError):
            parser.error(f"--optimizers: unknown optimizer {n!r}; expected some of {', '.join(known)} "
                         "(comma-separated)")
        if canonical not in names:
            names.append(canonical)
    if not names:
        parser.error(f"--optimizers={text!r}: expected at least one name of {', '.join(known)}")
    return names


def _out_dir(parser, text):
    out = Path(text)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        parser.error(f"--out={text!r}: cannot write there ({e.strerror or e})")
    return out


def _device(parser, text):
    import torch
    try:
        device = torch.device(text)
        torch.zeros(1, device=device)
    except (RuntimeError, ValueError, AssertionError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        parser.error(f"--device={text!r}: not usable here ({first})")
    if device.type == "meta":
        parser.error(f"--device={text!r}: expected a device that holds data, e.g. cpu or cuda")
    return str(device)


def _demo(parser, args) -> int:
    from .demo.run import DemoConfig, run
    fused = _FUSED.get(args.fused.lower())
    if args.fused.lower() not in _FUSED:
        parser.error(f"--fused={args.fused!r}: expected one of none, true, false")
    config = DemoConfig(
        optimizers=_optimizers(parser, args.optimizers), epochs=_int(parser, "--epochs", args.epochs, 1),
        batch_size=_int(parser, "--batch-size", args.batch_size, 1),
        seed=_int(parser, "--seed", args.seed, 0, _MAX_SEED),
        device=_device(parser, args.device), fused=fused,
        trajectory_steps=None if args.trajectory_steps is None
        else _int(parser, "--trajectory-steps", args.trajectory_steps, 1))
    config.out = _out_dir(parser, args.out)
    try:
        import matplotlib  # noqa: F401
        import PIL  # noqa: F401
        import rich  # noqa: F401
    except ImportError as e:
        print(f"{_DEMO_EXTRA} ({e})", file=sys.stderr)
        return 1
    return run(config)


def _list() -> int:
    import inspect
    base = inspect.signature(optimizer.Optimizer.__init__).parameters.values()
    shared = ", ".join(f"{p.name}={p.default!r}" for p in base if p.default is not inspect.Parameter.empty)
    print(f"Every optimizer takes the Optimizer arguments ({shared}); below, each one's own defaults.\n")
    for r in optimizer.records():
        aliases = f" (also {', '.join(r.aliases)})" if r.aliases else ""
        print(f"{r.name}{aliases}: {r.description or '(no description)'}")
        defaults = ", ".join(f"{k}={v!r}" for k, v in r.defaults().items())
        print(f"    defaults: {defaults or '(only the Optimizer arguments)'}")
        if r.capabilities:
            print(f"    capabilities: {', '.join(sorted(r.capabilities))}")
    return 0


def _import_mxnet(parser, args) -> int:
    import torch
    from . import _io, mxnet
    for flag, path in (("PARAMS", args.params), ("STATES", args.states)):
        if path is not None and not os.path.isfile(path):
            parser.error(f"{flag}={path!r}: no such file")
    out = Path(args.out)
    states_out = Path(args.states_out) if args.states_out else out.with_suffix(".states")
    if args.states is None and args.states_out:
        parser.error("--states-out without STATES: there are no trainer states to write")
    for flag, path in (("--out", out), ("--states-out", states_out if args.states else None)):
        if path is not None and (path.is_dir() or not path.parent.resolve().is_dir()):
            parser.error(f"{flag}={str(path)!r}: not a file in an existing folder")
    if args.states is not None and out.resolve() == states_out.resolve():
        parser.error(f"--states-out={str(states_out)!r} is --out: give them different paths")
    try:
        weights, trainer = mxnet.convert(args.params, args.states, order=args.order)
    except (ValueError, OSError) as exc:
        parser.error(str(exc))
    try:
        data = io.BytesIO()
        torch.save(weights, data)
        _write(out, data.getvalue())
        if trainer is not None:
            trainer.save_states(states_out)
    except OSError as exc:
        parser.error(f"cannot write the output: {exc}")
    _summary(args, weights, trainer, out, states_out)
    return 0


def _write(path, data):
    """``data`` to ``path`` through a temporary file and a rename: never half a file under the name."""
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # mkstemp's 0600 otherwise
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _summary(args, weights, trainer, out, states_out):
    """What was found and written: a rich table when rich is installed, plain lines otherwise."""
    rows = [(n, "x".join(map(str, t.shape)) or "()", str(t.dtype).replace("torch.", "")) for n, t in weights.items()]
    lines = [f"weights: {len(weights)} arrays, {sum(t.numel() for t in weights.values())} values -> {out}"]
    if trainer is not None:
        opt = trainer.optimizer
        hyper = {k: v for k, v in vars(opt).items() if not k.startswith("_") and k not in (
            "param_dict", "lr_scheduler", "idx2name", "sym_info", "lr_mult", "wd_mult")}
        sched = opt.lr_scheduler
        lines += [f"optimizer: {type(opt).__name__}(" + ", ".join(f"{k}={v!r}" for k, v in hyper.items()) + ")",
                  f"scheduler: {type(sched).__name__ + repr(vars(sched)) if sched is not None else None}",
                  f"num_update: {opt.num_update}; update counts per device: "
                  + "; ".join(f"{d}: {len(c)} indices, max {max(c.values(), default=0)}"
                              for d, c in opt._all_index_update_counts.items()),
                  f"states: {len(trainer._updater.states)} of {len(weights)} parameters (order: {args.order}) "
                  f"-> {states_out}"]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        for r in rows:
            print(f"  {r[0]}  {r[1]}  {r[2]}")
        print("\n".join(lines))
        return
    table = Table(title=f"MXNet checkpoint {args.params}")
    for col in ("index" if trainer is not None else "#", "name", "shape", "dtype", "state"):
        table.add_column(col)
    states = trainer._updater.states if trainer is not None else {}
    index = {n: i for i, n in enumerate(trainer._names)} if trainer is not None else {}
    for k, (n, shape, dtype) in enumerate(rows):
        i = index.get(n, k)
        table.add_row(str(i), n, shape, dtype, "yes" if i in states else "-" if trainer is not None else "")
    console = Console()
    console.print(table)
    for line in lines:
        console.print(line, highlight=False)


def main(argv=None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        from .bench import main as bench_main
        return bench_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command == "list":
            return _list()
        if args.command == "import-mxnet":
            return _import_mxnet(args.parser, args)
        return _demo(args.parser, args)
    except BrokenPipeError:  # `optzoo list | head`: the reader is gone; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
