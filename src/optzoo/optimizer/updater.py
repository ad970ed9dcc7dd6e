"""MXNet's ``Updater``: holds the states of an optimizer's parameters, keyed by index.

``get_states`` / ``set_states`` round-trip exactly through bytes written with ``torch.save`` and read
back with ``torch.load(weights_only=True)``: plain tensors, numbers, strings and containers only, so
loading never executes code (MXNet pickles the optimizer object instead).
"""
from __future__ import annotations

import io
import numbers

import torch

from .._checks import check_tensor_pair
from . import _tree
from .base import _CACHES, Optimizer
from .registry import get_record, records

__all__ = ["Updater", "get_updater", "dump_optimizer", "load_optimizer"]

_FORMAT = "optzoo.updater/1"
# Bookkeeping rebuilt on load rather than stored: a view into _all_index_update_counts, the ctor call.
_NOT_DUMPED = {"_index_update_count", "_init_args", "param_dict", "lr_scheduler", "_fused"} | _CACHES


def calls(opt, positions, weights):
    """The ``update`` calls MXNet's Updater makes for these parameters (lists of positions): an aggregating
    optimizer (``aggregate_num`` > 0) gets lists of at most ``aggregate_num`` of one dtype (in order of
    first appearance); the others get one call per index, which optzoo reads as one list (the same values:
    see ``Optimizer.update``; indices whose counts differ are read one by one)."""
    n = opt.aggregate_num
    if n <= 0:
        return [positions] if positions else []
    groups = {}
    for k in positions:
        groups.setdefault(weights[k].dtype, []).append(k)
    return [group[start:start + n] for group in groups.values() for start in range(0, len(group), n)]


def _device_id(weight):
    return weight.device.index or 0


class Updater:
    """Applies an optimizer to ``(index, grad, weight)`` (scalars or lists), creating states on first use.

    Note MXNet's argument order: the gradient comes before the weight.
    """

    def __init__(self, optimizer: Optimizer):
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer={optimizer!r} is invalid: expected an optzoo.optimizer.Optimizer")
        self.optimizer = optimizer
        self.states = {}
        self.states_synced = {}
        self.aggregate_updates = optimizer.aggregate_num > 0

    def __call__(self, index, grad, weight):
        if isinstance(index, (list, tuple)):
            indices, grads, weights = list(index), list(grad), list(weight)
            if not (len(grads) == len(weights) == len(indices)):
                raise ValueError(f"index, grad and weight lists have lengths {len(indices)}, {len(grads)} and "
                                 f"{len(weights)}: expected equal lengths")
        else:
            indices, grads, weights = [index], [grad], [weight]
        indices = [i.decode() if isinstance(i, bytes) else i for i in indices]
        for i, w, g in zip(indices, weights, grads):
            check_tensor_pair(i, w, g)
        opt = self.optimizer
        opt._set_current_context(_device_id(weights[0]))
        for i, w in zip(indices, weights):
            if i not in self.states:
                self.states[i] = opt.create_state_multi_precision(i, w)
                self.states_synced[i] = True
            elif not self.states_synced[i]:
                self.states[i] = _tree.to_device(self.states[i], w.device)
                self.states_synced[i] = True
        opt._update_calls(calls(opt, list(range(len(indices))), weights), indices, weights, grads,
                          [self.states[i] for i in indices])

    def get_states(self, dump_optimizer=False) -> bytes:
        """The states (and, with ``dump_optimizer``, the optimizer) as bytes for ``set_states``."""
        blob = {"format": _FORMAT,
                "states": {i: _tree.to_plain(s) for i, s in self.states.items()},
                "optimizer": _dump(self.optimizer) if dump_optimizer else None}
        buf = io.BytesIO()
        torch.save(blob, buf)
        return buf.getvalue()

    def set_states(self, states: bytes) -> None:
        """Load what ``get_states`` produced; a dumped optimizer replaces this one. Nothing runs code."""
        try:
            blob = torch.load(io.BytesIO(states), weights_only=True, map_location="cpu")
        except Exception as exc:  # truncated, corrupted or foreign bytes
            raise ValueError(f"states could not be read ({exc.__class__.__name__}: {exc}): expected bytes "
                             "from Updater.get_states") from None
        if not isinstance(blob, dict) or blob.get("format") != _FORMAT:
            raise ValueError(f"states are not an optzoo Updater dump: expected format {_FORMAT!r}")
        optimizer = load_optimizer(blob["optimizer"]) if blob["optimizer"] is not None else None
        if optimizer is not None:
            self.optimizer = optimizer
            self.aggregate_updates = optimizer.aggregate_num > 0
        self.states = {i: self.optimizer._mark_state(s) for i, s in blob["states"].items()}
        self.states_synced = dict.fromkeys(self.states, False)


def get_updater(optimizer: Optimizer) -> Updater:
    """MXNet's ``get_updater``: a callable ``(index, grad, weight)`` that updates in place."""
    return Updater(optimizer)


# ---------------------------------------------------------------------------------------------- dumps
def _plain(value) -> bool:
    if value is None or isinstance(value, (bool, numbers.Number, str, torch.Tensor)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, (int, str)) and _plain(v) for k, v in value.items())
    return False


def _dump_scheduler(sched):
    from .. import lr_scheduler as lrs
    if sched is None:
        return None
    cls = type(sched)
    if getattr(lrs, cls.__name__, None) is not cls:
        raise TypeError(f"lr_scheduler of type {cls.__name__} cannot be dumped: expected a scheduler "
                        "from optzoo.lr_scheduler")
    return {"class": cls.__name__, "vars": {k: v for k, v in vars(sched).items() if _plain(v)}}


def _load_scheduler(blob):
    from .. import lr_scheduler as lrs
    if blob is None:
        return None
    cls = getattr(lrs, blob["class"], None)
    if not (isinstance(cls, type) and issubclass(cls, lrs.LRScheduler)):
        raise ValueError(f"unknown scheduler class {blob['class']!r} in dump")
    sched = cls.__new__(cls)
    sched.__dict__.update(blob["vars"])
    return sched


def dump_optimizer(opt: Optimizer) -> dict:
    """A plain (weights_only-loadable) description of an optimizer: constructor call plus bookkeeping."""
    record = next((r for r in records() if r.cls is type(opt)), None)
    if record is None:
        raise TypeError(f"optimizer {type(opt).__name__} is not registered: register it to dump it")
    args, kwargs = opt._init_args
    kwargs = {k: v for k, v in kwargs.items() if k not in ("lr_scheduler", "param_dict") and _plain(v)}
    return {"name": record.name, "args": [a for a in args if _plain(a)], "kwargs": kwargs,
            "scheduler": _dump_scheduler(opt.lr_scheduler),
            "vars": {k: v for k, v in vars(opt).items() if k not in _NOT_DUMPED and _plain(v)}}


def load_optimizer(blob: dict) -> Optimizer:
    """Rebuild an optimizer from ``dump_optimizer`` output."""
    cls = get_record(blob["name"]).cls
    opt = cls(*blob["args"], **blob["kwargs"])
    opt.__dict__.update(blob["vars"])
    opt.lr_scheduler = _load_scheduler(blob["scheduler"])
    opt._index_update_count = opt._all_index_update_counts.setdefault(opt._current_context, {})
    return opt


_dump = dump_optimizer  # get_states' argument is named dump_optimizer, as MXNet's
