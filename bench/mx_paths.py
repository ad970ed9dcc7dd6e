"""The three default paths side by side: the torch face (``optzoo.torch.create``), the Gluon ``Trainer`` and the
MXNet-style ``Updater`` (``get_updater``), each step paired with torch's fused Adam on the same workload.

    .venv/bin/python bench/mx_paths.py                                  # single, resnet50, small; adam, sgd, lamb
    .venv/bin/python bench/mx_paths.py --workloads small --optimizers adam,nag --rounds 3

``python -m optzoo.bench`` measures the torch face only; this measures what porting teams run. Per workload,
optimizer and path: the median ratio of the step's time to torch fused Adam's step timed right before it
(``x Adam time``, < 1 is faster; :func:`optzoo.bench._steps.time_paired`), and from it ``x Adam GB/s`` =
(bytes moved per element / Adam's 28) / ratio, as the bench computes it. The paths take turns within each round
(the machine's speed drifts); each gets the median of its rounds.

Gluon's Trainer updates only parameters whose gradient is fresh (a new tensor, or one backward accumulated into,
which a hook marks): before each step every parameter is marked so, as backward's hooks would (one list, outside
what the Trainer does). The Updater gets the parameters' tensors (``detach``) and the gradients, as the Trainer
hands them.
"""
from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import warnings

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "src"))

import optzoo  # noqa: E402
import optzoo.torch as ot  # noqa: E402
from optzoo.bench._steps import time_paired  # noqa: E402
from optzoo.bench.workloads import bytes_per_element, make_workload, param_shape, settings_for  # noqa: E402

PATHS = ("face", "trainer", "updater")


def _params(workload, name, seed):
    gen = torch.Generator().manual_seed(seed)
    out = [torch.nn.Parameter(torch.randn(param_shape(name, s), generator=gen)) for s in workload.shapes]
    for p in out:
        p.grad = torch.randn(p.shape, generator=gen)
    return out


class _TrainerStep:
    """``trainer.step(1)`` with every gradient marked fresh first, as backward's accumulation hooks mark them."""

    def __init__(self, name, settings, params):
        self.trainer = optzoo.Trainer({f"p{j}": p for j, p in enumerate(params)}, name, dict(settings), kvstore=None)
        self.n = len(params)

    def step(self):
        self.trainer._fresh = [True] * self.n  # (each hook sets its parameter's flag; backward pays for that)
        self.trainer.step(1)


class _UpdaterStep:
    def __init__(self, name, settings, params):
        self.updater = optzoo.optimizer.get_updater(optzoo.optimizer.create(name, **settings))
        self.indices = list(range(len(params)))
        self.weights = [p.detach() for p in params]
        self.grads = [p.grad for p in params]

    def step(self):
        self.updater(self.indices, self.grads, self.weights)


def _make(path, name, settings, params):
    if path == "face":
        return ot.create(name, params, **settings)
    return (_TrainerStep if path == "trainer" else _UpdaterStep)(name, settings, params)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workloads", default="single,resnet50,small")
    ap.add_argument("--optimizers", default="adam,sgd,lamb")
    ap.add_argument("--rounds", type=int, default=3, help="rounds, the paths taking turns in each (default 3)")
    ap.add_argument("--repeat", type=int, default=10, help="paired steps per path and round, at most")
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of the full workload sizes (0, 1]")
    args = ap.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); x Adam time (x Adam GB/s)")
    print("| workload | optimizer | " + " | ".join(PATHS) + " |")
    print("|---|---|" + "---|" * len(PATHS))
    for key in args.workloads.split(","):
        workload = make_workload(key, args.scale)
        for name in args.optimizers.split(","):
            settings = settings_for(name)
            ref = torch.optim.Adam(_params(workload, "adam", 0), lr=1e-3, fused=True)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                opts = {path: _make(path, name, settings, _params(workload, name, 0)) for path in PATHS}
                for opt in opts.values():
                    for _ in range(3):
                        opt.step()  # states made, kernels compiled
                got = {path: [] for path in PATHS}
                for r in range(args.rounds):
                    for path in PATHS[r % len(PATHS):] + PATHS[:r % len(PATHS)]:
                        got[path].append(time_paired(opts[path].step, ref.step, repeat=args.repeat, warmup=1,
                                                     budget=0.5)["ratio"])
            per = bytes_per_element(name, settings=settings) / 28.0
            # three significant digits: at a smoke test's tiny scale, under load, a ratio of a few hundred left "0.00"
            cells = [f"{statistics.median(got[p]):.3g} ({per / statistics.median(got[p]):.3g})" for p in PATHS]
            print(f"| {key} | {name} | " + " | ".join(cells) + " |", flush=True)
            del ref, opts
    return 0


if __name__ == "__main__":
    sys.exit(main())
