"""Train a small network on the digits with one optimizer through :class:`optzoo.Trainer`, and measure it."""
from __future__ import annotations

import dataclasses
import math
import time

import torch

from .. import optimizer as _optimizer
from ..trainer import Trainer
from .data import Digits

__all__ = ["SETTINGS", "settings_for", "DigitsMLP", "Result", "train", "state_bytes_per_param"]

#: Hyperparameters per optimizer on the digits network: the tutorial's snippets (``optimizer.SGD(learning_rate=0.1,
#: wd=0., momentum=0.8)`` ...), changed only where the snippet does not train this network in a few epochs
#: (the comment says how). Gradients reach the optimizer averaged over the batch (``rescale_grad = 1/batch``).
SETTINGS = {
    "sgd": {"learning_rate": 0.1, "wd": 0.0, "momentum": 0.8},
    "nag": {"learning_rate": 0.1, "momentum": 0.8},
    "adagrad": {"learning_rate": 0.1, "eps": 1e-7},
    "rmsprop": {"learning_rate": 0.001, "gamma1": 0.9, "gamma2": 0.9, "epsilon": 1e-7, "centered": False},
    "adadelta": {"rho": 0.9, "epsilon": 1e-7},
    "adam": {"learning_rate": 0.001, "beta1": 0.9, "beta2": 0.999, "epsilon": 1e-8},
    "adamax": {"learning_rate": 0.002, "beta1": 0.9, "beta2": 0.999},
    "nadam": {"learning_rate": 0.001, "beta1": 0.9, "beta2": 0.999, "epsilon": 1e-8},
    "signum": {"learning_rate": 0.01, "momentum": 0.9, "wd_lh": 0.0},
    # the snippet's batch_scale=1 makes LBSGD plain SGD: accumulate 4 batches and warm up over 5 epochs instead
    "lbsgd": {"learning_rate": 0.05, "momentum": 0.0, "warmup_strategy": "linear", "warmup_epochs": 5,
              "batch_scale": 4, "updates_per_epoch": 45},
    "dcasgd": {"learning_rate": 0.1, "momentum": 0.0, "lamda": 0.04},
    "ftrl": {"learning_rate": 0.5, "lamda1": 0.01, "beta": 1},  # the snippet's 0.1 is slow here
    "ftml": {"beta1": 0.6, "beta2": 0.999, "epsilon": 1e-8},
    # the gradient of the whole training set's loss (1438 images), as posterior sampling wants
    "sgld": {"learning_rate": 1e-4, "rescale_grad": 1438.0},
    "lamb": {"learning_rate": 0.003},
    "lars": {"learning_rate": 1.0, "momentum": 0.9, "eta": 0.001},
    "groupadagrad": {"learning_rate": 0.1},
    "test": {"rescale_grad": -0.05},  # MXNet's Test adds rescale_grad * grad: a negative scale descends
}


def settings_for(name: str) -> dict:
    """The demo's hyperparameters for a registered name (an optimizer it does not know gets its own defaults)."""
    return dict(SETTINGS.get(_optimizer.get_record(name).name, {}))


class DigitsMLP(torch.nn.Module):
    """64 -> hidden -> 10 with ReLU. Every parameter is 2-D (biases are rows) so that GroupAdaGrad, which
    keeps one accumulator per row of a 2-D weight, can train all of them like the other optimizers."""

    def __init__(self, hidden: int = 64):
        super().__init__()
        self.w1 = torch.nn.Parameter(torch.randn(64, hidden) * math.sqrt(2.0 / 64))
        self.b1 = torch.nn.Parameter(torch.zeros(1, hidden))
        self.w2 = torch.nn.Parameter(torch.randn(hidden, 10) * math.sqrt(1.0 / hidden))
        self.b2 = torch.nn.Parameter(torch.zeros(1, 10))

    def forward(self, x):
        return torch.relu(x @ self.w1 + self.b1) @ self.w2 + self.b2


@dataclasses.dataclass
class Result:
    """One optimizer's run: per-step batch losses, final full-train-set loss, test accuracy and costs."""
    name: str
    settings: dict
    losses: list
    final_loss: float
    accuracy: float
    ms_per_step: float
    state_bytes_per_param: float
    error: str = ""   # set when training raised (a user-registered optimizer may not suit this network)

    @property
    def diverged(self) -> bool:
        return not math.isfinite(self.final_loss)


def _state_bytes(state) -> int:
    if state is None:
        return 0
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    return sum(_state_bytes(s) for s in state)


def state_bytes_per_param(name: str, settings: dict, params) -> float:
    """Bytes of optimizer state per parameter element, from the states a fresh ``create(name, **settings)``
    makes for ``params`` (on the meta device: nothing is allocated). Adam: 8 (mean and variance in fp32)."""
    opt = _optimizer.create(name, **settings)
    params = list(params)
    total = sum(_state_bytes(opt.create_state_multi_precision(i, torch.empty_like(p, device="meta")))
                for i, p in enumerate(params))
    return total / sum(p.numel() for p in params)


def _batches(n, batch_size, generator):
    order = torch.randperm(n, generator=generator)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def train(name: str, data: Digits, *, epochs: int = 10, batch_size: int = 32, seed: int = 0, fused=None,
          hidden: int = 64, settings: dict | None = None, on_step=None) -> Result:
    """Train :class:`DigitsMLP` with optimizer ``name`` for ``epochs`` passes over ``data.x_train``.

    The same ``seed`` gives every optimizer the same initial weights and batch order. The loss is the summed
    cross-entropy of the batch (``trainer.step(batch_size)`` averages it, as MXNet). ``ms_per_step`` is the
    median wall time of ``trainer.step`` alone (the first step, which creates the states, is excluded when
    there are others). ``on_step()`` is called after every step (progress).
    """
    settings = settings_for(name) if settings is None else dict(settings)
    torch.manual_seed(seed)
    device = data.x_train.device
    model = DigitsMLP(hidden).to(device)
    trainer = Trainer(model.named_parameters(), name, settings, fused=fused)
    generator = torch.Generator().manual_seed(seed)
    losses, times = [], []
    for _ in range(epochs):
        for idx in _batches(len(data.x_train), batch_size, generator):
            idx = idx.to(device)
            x, y = data.x_train[idx], data.y_train[idx]
            loss = torch.nn.functional.cross_entropy(model(x), y, reduction="sum")
            loss.backward()
            start = time.perf_counter()
            trainer.step(len(idx))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
            model.zero_grad(set_to_none=False)
            losses.append(loss.item() / len(idx))
            if on_step is not None:
                on_step()
    with torch.no_grad():
        final_loss = torch.nn.functional.cross_entropy(model(data.x_train), data.y_train).item()
        accuracy = (model(data.x_test).argmax(1) == data.y_test).double().mean().item()
    steady = sorted(times[1:] or times)
    ms = 1e3 * steady[len(steady) // 2] if steady else float("nan")
    return Result(_optimizer.get_record(name).name, settings, losses, final_loss, accuracy, ms,
                  state_bytes_per_param(name, settings, model.parameters()))
