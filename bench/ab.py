"""Two revisions of optzoo in one process: the working tree's against a git revision's, each step paired with
torch's fused Adam on the same workload, rounds interleaved (the machine's speed drifts; only ratios within
one process compare; the two trees swap places every round).

    .venv/bin/python bench/ab.py --base 84fb8f1                      # small, resnet50, mlp; adam, sgd, lamb
    .venv/bin/python bench/ab.py --base HEAD~3 --workloads small --optimizers adam --flat --rounds 12
    OMP_NUM_THREADS=1 .venv/bin/python bench/ab.py --base main       # one thread: steadier on a shared machine
    .venv/bin/python bench/ab.py --base HEAD~1 --scheduler           # a new lr at every step (warm-up, decay)

The revision's ``src/optzoo`` is exported (``git archive``) into a temporary folder as the package
``optzoo_base`` (its modules import each other relatively), so both live side by side. Prints, per workload
and optimizer, the median step time of this tree over the revision's (< 1: this tree is faster) and each
one's median ratio to torch's fused Adam.
"""
from __future__ import annotations

import argparse
import importlib
import io
import pathlib
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from optzoo.bench.workloads import make_workload, param_shape  # noqa: E402

OPTIMIZERS = {"adam": ("Adam", {}), "sgd": ("SGD", {"lr": 0.1, "momentum": 0.9}), "lamb": ("LAMB", {}),
              "lars": ("LARS", {"lr": 0.1, "momentum": 0.9}), "nadam": ("Nadam", {}), "rmsprop": ("RMSProp", {}),
              "adagrad": ("AdaGrad", {}), "sgld": ("SGLD", {}), "groupadagrad": ("GroupAdaGrad", {})}
MLP = ((10, 10), (10,), (10, 10), (10,), (1, 10), (1,))  # a 3-layer perceptron of width 10: per-step overhead
FEW = ((512, 256), (512,), (10, 512))  # a few parameters, one of them large (131K): a small model's step
ONE = ((32_768,),)  # one small parameter
MNIST = ((128, 784), (128,), (10, 128), (10,))  # a 784-128-10 perceptron: one large weight, a small pack


def export(rev: str, into: pathlib.Path) -> None:
    """``src/optzoo`` at ``rev`` as the package ``optzoo_base`` under ``into``."""
    blob = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "src/optzoo"], check=True,
                          capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        tar.extractall(into, filter="data")
    (into / "src" / "optzoo").rename(into / "optzoo_base")
    for path in (into / "optzoo_base").rglob("*.py"):  # older trees import themselves by absolute name
        text = path.read_text()
        for a, b in (("from optzoo.", "from optzoo_base."), ("from optzoo import", "from optzoo_base import"),
                     ("import optzoo.", "import optzoo_base."),
                     # revisions before 2026-12-07 took direct calls (_direct.eligible) for "optzoo." classes only
                     ('startswith("optzoo.")', 'startswith("optzoo_base.")')):
            text = text.replace(a, b)
        path.write_text(text)


def shapes(workload: str):
    named = {"mlp": MLP, "few": FEW, "one": ONE, "mnist": MNIST}
    if workload in named:
        return named[workload]
    return make_workload("resnet50" if workload == "resnet" else workload).shapes


def params(workload: str, seed: int, name: str = "adam"):
    """The workload's parameters, shaped as optimizer ``name`` takes them (GroupAdaGrad: 2-D)."""
    gen = torch.Generator().manual_seed(seed)
    out = [torch.nn.Parameter(torch.randn(param_shape(name, s), generator=gen)) for s in shapes(workload)]
    for p in out:
        p.grad = torch.randn(p.shape, generator=gen)
    return out


def make(face, name: str, ps, flat: bool, scheduled: bool = False):
    if flat:
        face.flatten_parameters(ps)
    cls, kwargs = OPTIMIZERS[name]
    opt = getattr(face, cls)(ps, **kwargs)
    return with_scheduler(opt) if scheduled else opt


def with_scheduler(opt):
    """``opt`` with a new lr at every step, as warm-up and decay schedules give (stepped outside the timing)."""
    opt.ab_scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
    return opt


def times(opt, n: int) -> list:
    out = []
    sched = getattr(opt, "ab_scheduler", None)
    for _ in range(n):
        t = time.perf_counter()
        opt.step()
        out.append(time.perf_counter() - t)
        if sched is not None:
            sched.step()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="HEAD", help="the git revision to compare with (default HEAD)")
    ap.add_argument("--workloads", default="small,resnet,mlp", help="of small, resnet, mlp, few, one, mnist, single (fp32)")
    ap.add_argument("--optimizers", default="adam,sgd,lamb", help=f"of {', '.join(OPTIMIZERS)}")
    ap.add_argument("--rounds", type=int, default=8, help="interleaved rounds (default 8)")
    ap.add_argument("--flat", action="store_true", help="both on flatten_parameters' opt-in flat layout")
    ap.add_argument("--scheduler", action="store_true",
                    help="a new lr at every step (LambdaLR) for both trees and torch's fused Adam")
    ap.add_argument("--this-flat", action="store_true",
                    help="this tree only on the flat layout (against a revision whose default owned the parameters)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        export(args.base, pathlib.Path(tmp))
        sys.path.insert(0, tmp)
        new, old = importlib.import_module("optzoo.torch"), importlib.import_module("optzoo_base.torch")
        print(f"this tree against {args.base}, torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
        for workload in args.workloads.split(","):
            steps = {"mlp": 100, "few": 100, "one": 100, "mnist": 100, "small": 10}.get(workload, 5)
            for name in args.optimizers.split(","):
                ref = torch.optim.Adam(params(workload, 0), fused=True)
                if args.scheduler:
                    with_scheduler(ref)
                # two instances of each tree, made in the order new, old, old, new: where a tree's tensors land in
                # memory moves its step time (an A/A run with one instance each, the first made faster: 0.93 and
                # 1.11 on 2,000 tensors of 1K, by creation order); each round times one instance of each
                made = {"new": [], "old": []}
                for k in ("new", "old", "old", "new"):
                    face, flat = (new, args.flat or args.this_flat) if k == "new" else (old, args.flat)
                    made[k].append(make(face, name, params(workload, 0, name), flat, args.scheduler))
                for opt in [ref] + made["new"] + made["old"]:
                    times(opt, 3)  # states made, kernels compiled
                got = {k: [] for k in ("torch", "new", "old")}
                for r in range(args.rounds):  # the two trees swap places every round: the one timed right after
                    opts = {"torch": ref, "new": made["new"][r // 2 % 2], "old": made["old"][r // 2 % 2]}
                    for k in ("torch", "new", "old") if r % 2 == 0 else ("torch", "old", "new"):  # torch runs ~1-3%
                        got[k] += times(opts[k], steps)  # slower on this machine (measured on ResNet-50)
                ms = {k: statistics.median(v) * 1e3 for k, v in got.items()}
                print(f"{workload:7s} {name:8s}{' flat' if args.flat else ' this flat' if args.this_flat else ''}{' sched' if args.scheduler else ''}  this/base {ms['new'] / ms['old']:.3f}   "
                      f"this {ms['new'] / ms['torch']:.3f}x, base {ms['old'] / ms['torch']:.3f}x torch fused Adam's "
                      f"time ({ms['torch']:.3f} ms)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
