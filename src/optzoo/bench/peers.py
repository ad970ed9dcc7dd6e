"""The peers: torch.optim (8 algorithms) and pytorch-optimizer (4, when installed), mapped to equal math.

=========  ==========================================  ===================================================
optzoo     torch.optim                                 math
=========  ==========================================  ===================================================
sgd        SGD(momentum)                               equal (torch keeps the unscaled velocity: same steps
                                                       at a constant lr)
nag        SGD(momentum, nesterov=True)                equal (same remark)
adagrad    Adagrad(eps)                                eps outside the sqrt in torch; same work
rmsprop    RMSprop(alpha=gamma1, eps[, centered,       eps outside the sqrt in torch; same work
           momentum=gamma2])
adadelta   Adadelta(lr=1, rho, eps)                    equal (no weight decay)
adam       Adam(betas, eps)                            torch adds eps after bias correction; same work
adamax     Adamax(betas, eps=0)                        equal
nadam      NAdam(betas, eps, momentum_decay=           torch keeps the momentum product per parameter
           schedule_decay)                             (MXNet shares one over all); same work per element
=========  ==========================================  ===================================================

pytorch-optimizer's LARS, Lamb, FTRL and SignSGD stand for lars, lamb, ftrl and signum: different
variants of the same ideas (its defaults where the algorithms differ), so their times are context,
not equal-math comparisons. (The reference for every optimizer's bandwidth is ``torch.optim.Adam(fused=True)``,
measured by the benchmark itself.)

The variant measured is torch's fastest: ``fused=True`` where the class has it, otherwise both
``foreach=True`` and the for-loop are measured and the faster is the peer.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import inspect

import torch

from ..optimizer import registry

__all__ = ["Peer", "torch_peer", "pytorch_optimizer_peer", "pytorch_optimizer_status", "TORCH_ALGORITHMS",
           "variants", "torch_bytes_moved"]

TORCH_ALGORITHMS = ("sgd", "nag", "adagrad", "rmsprop", "adadelta", "adam", "adamax", "nadam")


@dataclasses.dataclass
class Peer:
    library: str        # "torch.optim" or "pytorch_optimizer"
    cls: type
    kwargs: dict
    math: str           # how its math relates to optzoo's

    @property
    def name(self) -> str:
        return f"{self.cls.__name__}"


def mx_hyperparameters(name: str, settings: dict) -> dict:
    """Every hyperparameter of ``name`` as the benchmark sets it: MXNet defaults, then ``settings``."""
    record = registry.get_record(name)
    hp = {"learning_rate": None, "wd": 0.0, **record.defaults(), **settings}
    if hp["learning_rate"] is None:
        hp["learning_rate"] = 0.01
    return hp


def torch_peer(name: str, settings: dict) -> Peer | None:
    """The torch.optim class and arguments computing ``name``'s update, or None where torch has none."""
    key = registry.get_record(name).name
    if key not in TORCH_ALGORITHMS:
        return None
    hp = mx_hyperparameters(key, settings)
    lr, wd = hp["learning_rate"], hp["wd"]
    opt = torch.optim
    wd_note = "" if wd == 0 else "; torch couples weight decay (L2 in the gradient)"
    if key in ("sgd", "nag"):
        return Peer("torch.optim", opt.SGD, {"lr": lr, "momentum": hp["momentum"], "weight_decay": wd,
                                             "nesterov": key == "nag" and hp["momentum"] > 0},
                    "equal (torch keeps the unscaled velocity)")
    if key == "adagrad":
        return Peer("torch.optim", opt.Adagrad, {"lr": lr, "eps": hp["eps"], "weight_decay": wd},
                    "eps outside the sqrt in torch" + wd_note)
    if key == "rmsprop":
        centered = bool(hp["centered"])
        return Peer("torch.optim", opt.RMSprop, {"lr": lr, "alpha": hp["gamma1"], "eps": hp["epsilon"],
                                                 "weight_decay": wd, "centered": centered,
                                                 "momentum": hp["gamma2"] if centered else 0.0},
                    "eps outside the sqrt in torch")
    if key == "adadelta":
        return Peer("torch.optim", opt.Adadelta, {"lr": 1.0, "rho": hp["rho"], "eps": hp["epsilon"],
                                                  "weight_decay": wd},
                    "equal" if wd == 0 else "torch couples weight decay")
    if key == "adam":
        return Peer("torch.optim", opt.Adam, {"lr": lr, "betas": (hp["beta1"], hp["beta2"]), "eps": hp["epsilon"],
                                              "weight_decay": wd},
                    "torch adds eps after bias correction")
    if key == "adamax":
        return Peer("torch.optim", opt.Adamax, {"lr": lr, "betas": (hp["beta1"], hp["beta2"]), "eps": 0.0,
                                                "weight_decay": wd}, "equal")
    return Peer("torch.optim", opt.NAdam, {"lr": lr, "betas": (hp["beta1"], hp["beta2"]), "eps": hp["epsilon"],
                                           "momentum_decay": hp["schedule_decay"], "weight_decay": wd},
                "torch keeps the momentum product per parameter (MXNet: one shared)")


def variants(cls) -> list:
    """torch's fastest variant first: ``fused`` where the class has it, else ``foreach`` and the for-loop."""
    params = inspect.signature(cls.__init__).parameters
    if "fused" in params:
        return [{"fused": True}]
    if "foreach" in params:
        return [{"foreach": True}, {"foreach": False}]
    return [{}]


def variant_name(kwargs: dict) -> str:
    if kwargs.get("fused"):
        return "fused"
    if kwargs.get("foreach"):
        return "foreach"
    return "for-loop"


_PYTORCH_OPTIMIZER = {"lars": "LARS", "lamb": "Lamb", "ftrl": "FTRL", "signum": "SignSGD"}


def pytorch_optimizer_status() -> str:
    """The installed pytorch-optimizer version, or ``"not installed"``."""
    if importlib.util.find_spec("pytorch_optimizer") is None:
        return "not installed"
    try:
        import pytorch_optimizer
    except Exception as exc:  # pragma: no cover - a broken install
        return f"not importable: {type(exc).__name__}: {exc}"
    return getattr(pytorch_optimizer, "__version__", "installed")


def pytorch_optimizer_peer(name: str, settings: dict) -> Peer | None:
    """pytorch-optimizer's class for lars / lamb / ftrl / signum (None when absent or not installed).

    Only the arguments every version accepts are passed: ``lr`` and, where the algorithm has one, the
    momentum or betas; the rest are pytorch-optimizer's defaults.
    """
    key = registry.get_record(name).name
    if key not in _PYTORCH_OPTIMIZER or pytorch_optimizer_status() == "not installed":
        return None
    import pytorch_optimizer
    cls = getattr(pytorch_optimizer, _PYTORCH_OPTIMIZER[key], None)
    if cls is None:
        return None
    hp = mx_hyperparameters(key, settings)
    kwargs = {"lr": hp["learning_rate"]}
    accepted = inspect.signature(cls.__init__).parameters
    if "momentum" in accepted and "momentum" in hp:
        kwargs["momentum"] = hp["momentum"]
    if "betas" in accepted and "beta1" in hp:
        kwargs["betas"] = (hp["beta1"], hp["beta2"])
    return Peer("pytorch_optimizer", cls, kwargs, "a different variant (pytorch-optimizer's defaults)")


def torch_bytes_moved(opt: torch.optim.Optimizer) -> int:
    """Bytes one step of a torch optimizer moves (same convention as optzoo's: weight r/w, grad r,
    every per-element state tensor r/w; scalar step counters excluded). Call after its first step."""
    total = 0
    for group in opt.param_groups:
        for p in group["params"]:
            if p.grad is None:
                continue
            total += 3 * p.numel() * p.element_size()
            for value in opt.state[p].values():
                if isinstance(value, torch.Tensor) and value.dim() > 0:
                    total += 2 * value.numel() * value.element_size()
    return total
