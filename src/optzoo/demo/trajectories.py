"""2-D trajectories of optimizers on classic test functions (the tutorial's diagrams), through the MXNet-style API.

Each run puts the point :math:`p = (x, y)` in one float64 weight of shape (1, 2) and calls
``create_state_multi_precision`` / ``update_multi_precision`` with the exact gradient, as a training loop
would; the recorded path is the point after every update.
"""
from __future__ import annotations

import dataclasses

import torch

from .. import optimizer as _optimizer

__all__ = ["TestFunction", "FUNCTIONS", "CURVES", "curves_for", "trajectory", "trajectories"]


@dataclasses.dataclass(frozen=True)
class TestFunction:
    """A function of (x, y) with a known minimum, where to start, the plot window and the optimizers' settings.

    ``settings`` maps a curve name (see :data:`CURVES`) to its hyperparameters on this function.
    """
    name: str
    formula: str
    f: object
    start: tuple
    minimum: tuple
    xlim: tuple
    ylim: tuple
    steps: int
    settings: dict

    def __call__(self, x, y):
        return self.f(x, y)


def _rosenbrock(x, y):
    return (1 - x) ** 2 + 100 * (y - x * x) ** 2


def _beale(x, y):
    return (1.5 - x + x * y) ** 2 + (2.25 - x + x * y ** 2) ** 2 + (2.625 - x + x * y ** 3) ** 2


def _valley(x, y):
    return 0.1 * x ** 2 + 2 * y ** 2


#: curve label -> registered optimizer name ("momentum" is SGD with momentum)
CURVES = {"sgd": "sgd", "momentum": "sgd", "nag": "nag", "adam": "adam", "rmsprop": "rmsprop",
          "adagrad": "adagrad", "adadelta": "adadelta"}



def curves_for(names, everything: bool = False) -> list:
    """The curves to draw for a run of ``names``: those whose optimizer ran, in :data:`CURVES` order; "momentum"
    (SGD with momentum, not a registered name) only when ``everything`` ran, since nobody asked for it otherwise."""
    return [c for c, name in CURVES.items() if name in names and (c == name or everything)]


FUNCTIONS = {
    "rosenbrock": TestFunction(
        "Rosenbrock", "(1-x)^2 + 100(y-x^2)^2", _rosenbrock, (-1.5, 2.0), (1.0, 1.0), (-2.0, 2.0), (-1.0, 3.0), 1000,
        {"sgd": {"learning_rate": 1e-3}, "momentum": {"learning_rate": 1e-3, "momentum": 0.8},
         "nag": {"learning_rate": 1e-3, "momentum": 0.8}, "adam": {"learning_rate": 0.05},
         "rmsprop": {"learning_rate": 0.01, "epsilon": 1e-7}, "adagrad": {"learning_rate": 0.5, "eps": 1e-7},
         "adadelta": {"rho": 0.9, "epsilon": 1e-4}}),
    "beale": TestFunction(
        "Beale", "(1.5-x+xy)^2 + (2.25-x+xy^2)^2 + (2.625-x+xy^3)^2", _beale, (1.0, 1.5), (3.0, 0.5),
        (-1.0, 4.5), (-1.5, 2.0), 500,
        {"sgd": {"learning_rate": 1e-3}, "momentum": {"learning_rate": 1e-3, "momentum": 0.8},
         "nag": {"learning_rate": 1e-3, "momentum": 0.8}, "adam": {"learning_rate": 0.05},
         "rmsprop": {"learning_rate": 0.01, "epsilon": 1e-7}, "adagrad": {"learning_rate": 0.5, "eps": 1e-7},
         "adadelta": {"rho": 0.9, "epsilon": 1e-4}}),
    "valley": TestFunction(
        "narrow valley", "0.1x^2 + 2y^2", _valley, (-5.0, -2.0), (0.0, 0.0), (-5.5, 1.0), (-2.5, 2.5), 60,
        {"sgd": {"learning_rate": 0.4}, "momentum": {"learning_rate": 0.2, "momentum": 0.8},
         "nag": {"learning_rate": 0.2, "momentum": 0.8}, "adam": {"learning_rate": 0.3},
         "rmsprop": {"learning_rate": 0.1, "epsilon": 1e-7}, "adagrad": {"learning_rate": 1.0, "eps": 1e-7},
         "adadelta": {"rho": 0.9, "epsilon": 1e-3}}),
}


def trajectory(fn: TestFunction, curve: str, steps: int, settings: dict | None = None, on_step=None) -> torch.Tensor:
    """The path of ``curve``'s optimizer on ``fn`` from ``fn.start``: a float64 tensor of shape (steps + 1, 2).
    ``on_step()`` is called after every update (progress)."""
    name = CURVES.get(curve, curve)
    opt = _optimizer.create(name, **(fn.settings.get(curve, {}) if settings is None else settings))
    w = torch.tensor([fn.start], dtype=torch.float64)
    state = opt.create_state_multi_precision(0, w)
    path = [w[0].clone()]
    for _ in range(steps):
        p = w.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(fn(p[0, 0], p[0, 1]), p)
        opt.update_multi_precision(0, w, grad, state)
        path.append(w[0].clone())
        if on_step is not None:
            on_step()
    return torch.stack(path)


def trajectories(curves, steps: int | None = None) -> dict:
    """``{function key: {curve: path}}`` for every function in :data:`FUNCTIONS` and every curve given, each
    for ``steps`` updates (default: the function's own ``steps``)."""
    return {key: {c: trajectory(fn, c, fn.steps if steps is None else steps) for c in curves}
            for key, fn in FUNCTIONS.items()}
