"""MXNet's ``Updater``: holds the states of an optimizer's parameters, keyed by index.

``get_states`` / ``set_states`` round-trip exactly through bytes written with ``torch.save`` and read
back with ``torch.load(weights_only=True)``: plain tensors, numbers, strings and containers only, so
loading never executes code (MXNet pickles the optimizer object instead).
"""
from __future__ import annotations

import inspect
import operator
import numbers
import warnings

import torch

from .. import _io
from .._gc import pausing
from .._checks import check_tensor_pair, plain_pairs
from . import _tree, engine
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
    dtypes = list(map(operator.attrgetter("dtype"), map(weights.__getitem__, positions)))
    if dtypes and dtypes.count(dtypes[0]) == len(dtypes):  # one dtype (the common case): no loop body per position
        groups = {dtypes[0]: list(positions)}
    else:
        groups = {}
        for k, dtype in zip(positions, dtypes):
            groups.setdefault(dtype, []).append(k)
    return [group[start:start + n] for group in groups.values() for start in range(0, len(group), n)]


def _device_id(weight):
    # (not a tensor: the update's checks name it, after which the context is put back)
    return getattr(getattr(weight, "device", None), "index", None) or 0


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

    @pausing  # as Optimizer.update and the Trainer: a call's thousands of small containers never trigger a collection
    def __call__(self, index, grad, weight):
        if isinstance(index, (list, tuple)):
            indices, grads, weights = list(index), list(grad), list(weight)
            if not (len(grads) == len(weights) == len(indices)):
                raise ValueError(f"index, grad and weight lists have lengths {len(indices)}, {len(grads)} and "
                                 f"{len(weights)}: expected equal lengths")
        else:
            indices, grads, weights = [index], [grad], [weight]
        indices = [i.decode() if isinstance(i, bytes) else i for i in indices]
        # states to make or move first: every pair checked before (the common case in C-level maps, else each pair,
        # by name); otherwise the update's own checks come before anything changes
        synced = self.states_synced
        if any(i not in synced or not synced[i] for i in indices) and plain_pairs(weights, grads) is None:
            for i, w, g in zip(indices, weights, grads):
                check_tensor_pair(i, w, g)
        opt = self.optimizer
        # all or nothing: states made or moved for this call, and the optimizer's context, are put back on error
        before = {i: (self.states[i], self.states_synced[i]) for i in indices if i in self.states}
        context, contexts = opt._current_context, set(opt._all_index_update_counts)
        try:
            opt._set_current_context(_device_id(weights[0]))
            new = [(i, w) for i, w in zip(indices, weights) if i not in self.states]
            if new:  # made together, small ones end to end in one buffer (the executor's packs use them in place)
                for (i, _), st in zip(new, engine.adjacent([opt.create_state_multi_precision(i, w) for i, w in new],
                                                              engine.run_keys(opt, [w for _, w in new]))):
                    self.states[i] = st
                    self.states_synced[i] = True
            for i, w in zip(indices, weights):
                if not self.states_synced[i]:
                    self.states[i] = _tree.to_device(self.states[i], w.device)
                    self.states_synced[i] = True
            opt._update_calls(calls(opt, list(range(len(indices))), weights), indices, weights, grads,
                              [self.states[i] for i in indices])
        except BaseException:
            for i in indices:
                if i in before:
                    self.states[i], self.states_synced[i] = before[i]
                else:
                    self.states.pop(i, None)
                    self.states_synced.pop(i, None)
            for device_id in set(opt._all_index_update_counts) - contexts:
                del opt._all_index_update_counts[device_id]
            opt._set_current_context(context)
            raise

    def get_states(self, dump_optimizer=False) -> bytes:
        """The states (and, with ``dump_optimizer``, the optimizer) as bytes for ``set_states``, with a SHA-256
        of the whole payload (see :mod:`optzoo._io`)."""
        blob = {"format": _FORMAT, "owner": _registered_name(self.optimizer),
                "states": {i: _tree.to_plain(s) for i, s in self.states.items()},
                "optimizer": _dump(self.optimizer) if dump_optimizer else None}
        return _io.dumps(blob)

    def set_states(self, states: bytes) -> None:
        """Load what ``get_states`` produced; a dumped optimizer replaces this one. Nothing runs code.

        All or nothing: the digest, the optimizer (its hyperparameters pass its constructor's checks), the
        optimizer the states belong to and every state's layout are checked before anything changes; any
        failure is a ValueError and leaves this Updater as it was."""
        if not isinstance(states, (bytes, bytearray, memoryview)):
            raise TypeError(f"states is a {type(states).__name__}: expected bytes from Updater.get_states")
        where = "states"
        blob = _io.loads(states, _FORMAT, where, "bytes from Updater.get_states")
        if not isinstance(blob.get("states"), dict) or "optimizer" not in blob:
            raise ValueError(f"{where} are malformed: expected the 'states' and 'optimizer' entries of "
                             "Updater.get_states")
        optimizer = (load_optimizer(blob["optimizer"], where=f"{where}: the dumped optimizer")
                     if blob["optimizer"] is not None else None)
        target = optimizer if optimizer is not None else self.optimizer
        owner = blob.get("owner")  # absent from dumps written before it was recorded
        if owner is None and optimizer is not None:
            owner = blob["optimizer"]["name"]
        if owner is not None and owner != _registered_name(target):
            raise ValueError(f"{where} are the states of {owner}, expected {_registered_name(target)}: "
                             "load them into an Updater of the optimizer that saved them (or dump the optimizer "
                             "with them: get_states(dump_optimizer=True))")
        loaded = {}
        for i, s in blob["states"].items():
            if isinstance(i, bool) or not isinstance(i, (int, str)):
                raise ValueError(f"{where}: index {i!r} is invalid: expected an int or a str")
            _check_layout(target, i, s, f"{where}: the state of index {i!r}")
            loaded[i] = s
        # all checked: commit
        if optimizer is not None:
            self.optimizer = optimizer
            self.aggregate_updates = optimizer.aggregate_num > 0
        self.states = {i: self.optimizer._mark_state(s) for i, s in loaded.items()}
        self.states_synced = dict.fromkeys(self.states, False)


def _registered_name(opt) -> str:
    record = next((r for r in records() if r.cls is type(opt)), None)
    return record.name if record is not None else type(opt).__name__.lower()


def _skeleton(state):
    """The nesting of a state: None, "T" for a tensor, tuples of these (lists read as tuples)."""
    if state is None:
        return None
    if isinstance(state, torch.Tensor):
        return "T"
    if isinstance(state, (tuple, list)):
        return tuple(_skeleton(s) for s in state)
    raise TypeError(type(state).__name__)


def _check_layout(opt, index, state, what) -> None:
    """``state`` has the nesting ``opt.create_state_multi_precision`` makes (plain or multi-precision) for a
    weight of one of its tensors' shapes: a ValueError starting with ``what`` otherwise. Shapes and dtypes
    are checked against the weights at the first update (``Optimizer._check_state``)."""
    try:
        got = _skeleton(state)
    except TypeError as exc:
        raise ValueError(f"{what} holds a {exc}: expected tensors, tuples and None") from None
    shapes = list(dict.fromkeys(tuple(t.shape) for t in _tree.leaves(state))) or [(1,)]
    expected = set()
    for shape in shapes:
        try:
            plain = opt.create_state(index, torch.empty(shape, dtype=torch.float32, device="meta"))
        except Exception:  # noqa: BLE001 - a shape this optimizer cannot hold (GroupAdaGrad: 2-D only)
            continue
        sk = _skeleton(plain)
        expected.update((sk, ("T", sk) if opt._mp_master_first else (sk, "T")))
    if got not in expected:
        want = " or ".join(sorted(map(repr, expected))) or "a state of a weight it can hold"
        raise ValueError(f"{what} has the layout {got!r}: expected {want} ({type(opt).__name__}.create_state)")


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


def _python(value):
    """``value`` with numbers as plain Python numbers: a numpy scalar (``np.float64(0.01)``) would be saved as a
    numpy global that ``torch.load(weights_only=True)`` refuses, making the checkpoint unloadable."""
    if type(value) in (bool, int, float, complex) or value is None:  # np.float64 subclasses float: not plain
        return value
    if isinstance(value, numbers.Number) or type(value).__module__ == "numpy" and hasattr(value, "item"):
        item = getattr(value, "item", None)
        return item() if callable(item) else complex(value) if isinstance(value, numbers.Complex) \
            and not isinstance(value, numbers.Real) else float(value)
    if isinstance(value, tuple):
        return tuple(_python(v) for v in value)
    if isinstance(value, list):
        return [_python(v) for v in value]
    if isinstance(value, dict):
        return {_python(k): _python(v) for k, v in value.items()}
    return value


def _dump_scheduler(sched):
    from .. import lr_scheduler as lrs
    if sched is None:
        return None
    cls = type(sched)
    if getattr(lrs, cls.__name__, None) is not cls:
        raise TypeError(f"lr_scheduler of type {cls.__name__} cannot be dumped: expected a scheduler "
                        "from optzoo.lr_scheduler")
    return {"class": cls.__name__, "vars": {k: _python(v) for k, v in vars(sched).items() if _plain(v)}}


def _load_scheduler(blob, where):
    from .. import lr_scheduler as lrs
    if blob is None:
        return None
    if not (isinstance(blob, dict) and isinstance(blob.get("class"), str) and isinstance(blob.get("vars"), dict)):
        raise ValueError(f"{where}: the scheduler is malformed: expected its class name and vars")
    cls = getattr(lrs, blob["class"], None)
    if not (isinstance(cls, type) and issubclass(cls, lrs.LRScheduler)):
        raise ValueError(f"{where}: unknown scheduler class {blob['class']!r}")
    sched = cls.__new__(cls)
    sched.__dict__.update(blob["vars"])
    return sched


def dump_optimizer(opt: Optimizer) -> dict:
    """A plain (weights_only-loadable) description of an optimizer: constructor call plus bookkeeping."""
    record = next((r for r in records() if r.cls is type(opt)), None)
    if record is None:
        raise TypeError(f"optimizer {type(opt).__name__} is not registered: register it to dump it")
    args, kwargs = opt._init_args
    kwargs = {k: _python(v) for k, v in kwargs.items() if k not in ("lr_scheduler", "param_dict") and _plain(v)}
    return {"name": record.name, "args": [_python(a) for a in args if _plain(a)], "kwargs": kwargs,
            "scheduler": _dump_scheduler(opt.lr_scheduler),
            "vars": {k: _python(v) for k, v in vars(opt).items() if k not in _NOT_DUMPED and _plain(v)}}


def _init_names(cls) -> set:
    """The keyword arguments of ``cls``'s constructor chain (its own and the base class's)."""
    names = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None or klass is object:
            continue
        for p in inspect.signature(init).parameters.values():
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self":
                names.add(p.name)
    return names


#: Constructor arguments not stored under their own name, or not hyperparameters.
_UNCHECKED = {"lr_scheduler", "param_dict", "param_idx2name", "sym", "learning_rate"}


def _check_count(where, name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{where}: {name}={value!r} is invalid: expected an integer >= 0")


def _as_keywords(cls, args, kwargs) -> dict:
    """The constructor call ``cls(*args, **kwargs)`` as keywords only."""
    sig = inspect.signature(cls.__init__)
    bound = sig.bind_partial(None, *args, **kwargs).arguments
    out = {}
    for name, value in list(bound.items())[1:]:  # [0]: self
        if sig.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        elif sig.parameters[name].kind is inspect.Parameter.VAR_POSITIONAL:
            raise TypeError(f"{cls.__name__}() takes no extra positional arguments")
        else:
            out[name] = value
    return out


def load_optimizer(blob: dict, where: str = "optimizer dump") -> Optimizer:
    """Rebuild an optimizer from ``dump_optimizer`` output.

    The saved hyperparameters pass the constructor's checks (a ValueError starting with ``where`` names the
    one that does not), as do the update counts; nothing else is touched until the optimizer is built."""
    if not (isinstance(blob, dict) and isinstance(blob.get("name"), str) and isinstance(blob.get("args"), list)
            and isinstance(blob.get("kwargs"), dict) and isinstance(blob.get("vars"), dict) and "scheduler" in blob):
        raise ValueError(f"{where} is malformed: expected the name, args, kwargs, scheduler and vars of "
                         "dump_optimizer")
    try:
        cls = get_record(blob["name"]).cls
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{where}: {exc}") from None
    saved = blob["vars"]
    # the constructor checks the saved values, not only the call: vars overwrite what it set
    try:
        checked = _as_keywords(cls, blob["args"], blob["kwargs"])
    except TypeError as exc:
        raise ValueError(f"{where}: the saved call of {cls.__name__} is invalid: {exc}") from None
    checked.update({k: saved[k] for k in _init_names(cls) - _UNCHECKED if k in saved})
    if "lr" in saved:
        checked["learning_rate"] = saved["lr"]
    checked.pop("lr_scheduler", None)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cls(**checked)
        opt = cls(*blob["args"], **blob["kwargs"])
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{where}: a saved hyperparameter of {cls.__name__} is invalid: {exc}") from None
    for name in ("num_update", "begin_num_update"):
        if name in saved:
            _check_count(where, name, saved[name])
    counts = saved.get("_all_index_update_counts", {0: {}})
    if not (isinstance(counts, dict) and all(isinstance(c, dict) for c in counts.values())):
        raise ValueError(f"{where}: the update counts are malformed: expected a dict of device -> index -> count")
    for per_device in counts.values():
        for index, count in per_device.items():
            _check_count(where, f"the update count of index {index!r}", count)
    if saved.get("_current_context", 0) not in counts and counts:
        raise ValueError(f"{where}: _current_context={saved['_current_context']!r} has no update counts")
    sched = _load_scheduler(blob["scheduler"], where)
    opt.__dict__.update(saved)
    opt.lr_scheduler = sched
    opt._index_update_count = opt._all_index_update_counts.setdefault(opt._current_context, {})
    return opt


_dump = dump_optimizer  # get_states' argument is named dump_optimizer, as MXNet's
