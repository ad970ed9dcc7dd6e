"""MXNet 1.9.1's optimizer package on PyTorch tensors: ``create``, ``register``, every optimizer, ``Updater``."""
import importlib as _importlib
import importlib.util as _util

from .base import Optimizer
from .registry import OptimizerRecord, create, get_record, list_optimizers, records, register
from .updater import Updater, get_updater

# TEMPORARY while the optimizer files are being written in parallel: modules not yet present are skipped.
_MODULES = ["sgd", "nag", "signum", "lbsgd", "lars", "dcasgd", "sgld", "adagrad", "rmsprop", "adadelta",
            "adam", "adamax", "nadam", "ftrl", "ftml", "lamb", "group_adagrad", "test"]
for _m in _MODULES:
    if _util.find_spec(f"{__name__}.{_m}") is not None:
        _mod = _importlib.import_module(f".{_m}", __name__)
        globals().update({k: getattr(_mod, k) for k in getattr(_mod, "__all__", [])
                          or [n for n in vars(_mod) if n[:1].isupper()]})

# MXNet's spelling: ``mx.optimizer.Optimizer.create_optimizer``
Optimizer.create_optimizer = staticmethod(create)
Optimizer.register = staticmethod(register)
