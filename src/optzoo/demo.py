"""``python -m optzoo.demo``: every registered optimizer on the tutorial's classic test function.

Each optimizer minimises the Rosenbrock function f(x, y) = (1 - x)^2 + 100 (y - x^2)^2 from (-1.5, 2)
through the MXNet-style API (``create_state`` / ``update``), with the tutorial's hyperparameters where it
gives them, and the table shows how close each gets to the minimum (1, 1). The full demo (a real data
set, pictures, the CLI) is the subject of a later issue.
"""
from __future__ import annotations

import argparse
import math
import sys
import time

import torch

from . import optimizer

#: Hyperparameters per optimizer: the tutorial's snippets where it has one, tuned by hand otherwise.
DEFAULTS = {
    "sgd": {"learning_rate": 1e-3, "momentum": 0.0},
    "nag": {"learning_rate": 1e-3, "momentum": 0.8},
    "adagrad": {"learning_rate": 0.5, "eps": 1e-7},
    "rmsprop": {"learning_rate": 0.01, "gamma1": 0.9, "gamma2": 0.9, "epsilon": 1e-7},
    "adadelta": {"rho": 0.9, "epsilon": 1e-4},
    "adam": {"learning_rate": 0.05},
    "adamax": {"learning_rate": 0.05},
    "nadam": {"learning_rate": 0.05},
    "signum": {"learning_rate": 0.005, "momentum": 0.9},
    "lbsgd": {"learning_rate": 1e-3, "momentum": 0.8},
    "dcasgd": {"learning_rate": 5e-4, "lamda": 0.04},  # 1e-3 diverges from the steep start
    "ftrl": {"learning_rate": 0.5, "lamda1": 0.0, "beta": 1},
    "ftml": {"learning_rate": 0.05, "beta1": 0.6, "beta2": 0.999},
    "sgld": {"learning_rate": 1e-4},
    "lamb": {"learning_rate": 0.05},
    "lars": {"learning_rate": 1.0, "momentum": 0.9, "eta": 0.01},
    "groupadagrad": {"learning_rate": 0.5},
    "test": {"rescale_grad": -1e-3},  # MXNet's Test adds rescale_grad*grad: a negative scale descends
}


def rosenbrock(p):
    x, y = p[0, 0], p[0, 1]
    return (1 - x) ** 2 + 100 * (y - x * x) ** 2


def run(name, steps, seed):
    torch.manual_seed(seed)
    opt = optimizer.create(name, **DEFAULTS.get(name, {}))
    w = torch.tensor([[-1.5, 2.0]], dtype=torch.float64, requires_grad=True)  # 2-D: GroupAdaGrad wants rows
    state = opt.create_state_multi_precision(0, w.detach())
    start = time.perf_counter()
    for _ in range(steps):
        loss = rosenbrock(w)
        (grad,) = torch.autograd.grad(loss, w)
        opt.update_multi_precision(0, w.data, grad, state)
    ms = (time.perf_counter() - start) * 1e3 / steps
    x, y = w.detach()[0].tolist()
    return x, y, rosenbrock(w.detach()).item(), ms


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m optzoo.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--optimizers", default=",".join(optimizer.list_optimizers()),
                        help="comma-separated registered names (default: all)")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps={args.steps}: expected an integer >= 1")
    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    known = optimizer.list_optimizers()
    for n in names:
        if n.lower() not in known:
            parser.error(f"--optimizers: unknown optimizer {n!r}; expected some of {', '.join(known)}")
    print(f"Rosenbrock from (-1.5, 2), {args.steps} steps; minimum at (1, 1)\n")
    print(f"{'optimizer':<14}{'x':>10}{'y':>10}{'f(x, y)':>12}{'dist':>10}{'ms/step':>10}")
    for n in names:
        x, y, f, ms = run(n.lower(), args.steps, args.seed)
        print(f"{n:<14}{x:>10.4f}{y:>10.4f}{f:>12.3e}{math.hypot(x - 1, y - 1):>10.4f}{ms:>10.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
