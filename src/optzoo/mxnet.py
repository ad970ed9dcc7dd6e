"""MXNet 1.9.1 checkpoints read without MXNet: weights, and trainer / updater states to resume exactly.

* :func:`load_params` reads MXNet's NDArray file format (``mx.nd.save``, ``Block.save_parameters``,
  ``HybridBlock.export``'s ``-0000.params``) into tensors, bit for bit. It is a binary format, not a pickle.
* :func:`load_trainer_states` / :func:`load_updater_states` read ``gluon.Trainer.save_states`` files and
  ``Updater.get_states`` bytes. Those *are* pickles (of the optimizer object and of NDArrays), which
  ``pickle.load`` would let run any code they name; here a restricted unpickler knows only the globals MXNet
  1.9.1 writes there (its optimizer and scheduler classes, ``NDArray`` and ``bytearray``), turns them into
  plain data, and refuses every other global before anything is called.
* :func:`name_map` maps Gluon parameter names onto a torch module's ``state_dict`` names.

The format, as MXNet 1.x writes it (little-endian)::

    file    := u64 0x112, u64 0, u64 n, ndarray * n, u64 m, (u64 len, utf-8 name) * m   (m = 0: a list)
    ndarray := u32 magic (V2 0xF993FAC9; V3 0xF993FACA in numpy-shape mode), i32 storage type (0: dense),
               shape, [i32 device type, i32 device id, i32 dtype flag, the elements]
    shape   := i32 ndim (V3: -1 unknown), i64 * ndim

In V2 an ``ndim`` of 0 means "no array" and ends the record (legacy shapes had no 0-d); in V3 ``ndim`` -1
does. A pickled NDArray is this record alone, in ``{'handle': bytearray(...)}``.
"""
from __future__ import annotations

import io
import os
import pickle
import struct

import torch

__all__ = ["load_params", "load_trainer_states", "load_updater_states", "read_states", "name_map", "convert",
           "MXNetStates"]

_LIST_MAGIC = 0x112
_V2, _V3 = 0xF993FAC9, 0xF993FACA
_V1 = 0xF993FAC8
# mshadow's type flags
_DTYPES = {0: torch.float32, 1: torch.float64, 2: torch.float16, 3: torch.uint8, 4: torch.int32, 5: torch.int8,
           6: torch.int64, 7: torch.bool, 8: torch.int16, 9: torch.uint16, 10: torch.uint32, 11: torch.uint64,
           12: torch.bfloat16}
_STYPES = {1: "row_sparse", 2: "csr"}
_DEVICES = {1: "cpu", 2: "gpu", 3: "cpu_pinned", 5: "cpu_shared"}


# ---------------------------------------------------------------------------------------------- NDArray format
class _Reader:
    """Little-endian reads over bytes; every shortfall a ValueError starting with ``where``."""

    def __init__(self, data, where):
        self.data, self.pos, self.where = memoryview(data), 0, where

    def take(self, n, what):
        if n < 0 or self.pos + n > len(self.data):
            raise ValueError(f"{self.where} is truncated or damaged: {what} needs {n} bytes at offset {self.pos}, "
                             f"{len(self.data) - self.pos} left")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt, what):
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt), what))


def _read_ndarray(r: _Reader, what: str):
    """One NDArray record: a tensor, or None for MXNet's "no array" (``NDArray()``)."""
    (magic,) = r.unpack("I", f"{what}'s magic number")
    if magic not in (_V2, _V3):
        old = (" (or MXNet's pre-1.0 format V1/V0, not read here: load and save it with MXNet 1.x first)"
               if magic == _V1 or magic < 32 else "")
        raise ValueError(f"{r.where} is damaged or not an MXNet NDArray file: {what}'s magic number is "
                         f"0x{magic:08X}, expected 0x{_V2:08X} or 0x{_V3:08X}{old}")
    (stype,) = r.unpack("i", f"{what}'s storage type")
    if stype != 0:
        kind = _STYPES.get(stype)
        if kind is None:
            raise ValueError(f"{r.where} is damaged: {what} has storage type {stype}, expected 0 (dense)")
        raise ValueError(f"{r.where}: {what} is a {kind} (sparse) array: only dense arrays are supported; "
                         "convert it with .tostype('default') in MXNet")
    shape = _read_shape(r, what, magic)
    if shape is None:
        return None
    dev_type, _dev_id = r.unpack("ii", f"{what}'s context")
    if dev_type not in _DEVICES:
        raise ValueError(f"{r.where} is damaged: {what} has device type {dev_type}, expected one of "
                         f"{sorted(_DEVICES)}")
    (flag,) = r.unpack("i", f"{what}'s dtype")
    dtype = _DTYPES.get(flag)
    if dtype is None:
        raise ValueError(f"{r.where} is damaged: {what} has dtype flag {flag}, expected one of {sorted(_DTYPES)}")
    numel = 1
    for d in shape:
        numel *= d
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    raw = r.take(nbytes, f"{what}'s {numel} {str(dtype).replace('torch.', '')} elements")
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(raw), dtype=dtype).reshape(shape)


def _read_shape(r, what, magic):
    (ndim,) = r.unpack("i", f"{what}'s ndim")
    if magic == _V3 and ndim == -1 or magic == _V2 and ndim == 0:
        return None
    if not 0 <= ndim <= 32:
        raise ValueError(f"{r.where} is damaged: {what} has {ndim} dimensions, expected 0 to 32")
    dims = r.unpack(f"{ndim}q", f"{what}'s shape")
    if any(d < 0 for d in dims):
        raise ValueError(f"{r.where} is damaged: {what} has shape {dims}, expected sizes >= 0")
    return tuple(dims)


def _parse_file(data, where):
    """(list of tensors, list of names) of an ``mx.nd.save`` file's bytes."""
    r = _Reader(data, where)
    if len(data) < 24:
        raise ValueError(f"{where} is truncated or not an MXNet NDArray file: {len(data)} bytes, shorter than "
                         "its 24-byte header")
    magic, _reserved = r.unpack("QQ", "the header")
    if magic != _LIST_MAGIC:
        hint = " (it is a pickle: a trainer states file? see load_trainer_states)" if data[:1] == b"\x80" else ""
        raise ValueError(f"{where} is not an MXNet NDArray file: it starts with 0x{magic:X}, expected "
                         f"0x{_LIST_MAGIC:X}{hint}")
    (n,) = r.unpack("Q", "the array count")
    if n > len(data):  # each record takes bytes: a count beyond the file is damage, not a big file
        raise ValueError(f"{where} is damaged: it claims {n} arrays in {len(data)} bytes")
    arrays = [_read_ndarray(r, f"array {i}") for i in range(n)]
    (m,) = r.unpack("Q", "the name count")
    if m not in (0, n):
        raise ValueError(f"{where} is damaged: {m} names for {n} arrays")
    names = []
    for i in range(m):
        (length,) = r.unpack("Q", f"the length of name {i}")
        raw = r.take(length, f"name {i}")
        try:
            names.append(bytes(raw).decode("utf-8"))
        except UnicodeDecodeError:
            raise ValueError(f"{where} is damaged: name {i} is not UTF-8") from None
    if r.pos != len(data):
        raise ValueError(f"{where} is damaged: {len(data) - r.pos} unexpected bytes after its last name")
    if len(set(names)) != len(names):
        raise ValueError(f"{where} is damaged: a name appears twice")
    return arrays, names


def _read_bytes(path, what):
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            return f.read()
    except IsADirectoryError:
        raise IsADirectoryError(f"{what} file {path!r} could not be read: it is a directory") from None
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} file {path!r} does not exist") from None


def load_params(path) -> dict:
    """The arrays of an MXNet NDArray file, as tensors bit-equal to MXNet's (``mx.nd.load``).

    Reads what ``mx.nd.save`` writes (a dict, or a list: then the keys are ``"0"``, ``"1"``, ...),
    ``gluon.Block.save_parameters`` (structural names, ``"0.weight"``) and ``HybridBlock.export``'s
    ``-0000.params`` (names prefixed ``"arg:"`` and ``"aux:"``; strip them with :func:`name_map`), in every
    dtype MXNet writes (float16/32/64, bfloat16, int8/16/32/64, uint8/16/32/64, bool), any shape (0-d and
    empty in numpy-shape files), without MXNet and without unpickling. An ``NDArray()`` placeholder reads as
    None. Sparse arrays are refused (dense only). A truncated or damaged file is a ValueError naming it.
    """
    where = f"MXNet params file {os.fspath(path)!r}"
    arrays, names = _parse_file(_read_bytes(path, "MXNet params"), where)
    return dict(zip(names or [str(i) for i in range(len(arrays))], arrays))


def name_map(names, prefix=None) -> dict:
    """Gluon parameter names -> torch ``state_dict`` names, for models built with the same structure.

    ``names``: the keys of :func:`load_params` (or a Gluon ``collect_params()``). ``"arg:"`` / ``"aux:"``
    (``export``) are dropped, ``prefix`` (e.g. ``"resnet0_"``) too, and Gluon's parameter suffixes become
    torch's: ``gamma`` -> ``weight``, ``beta`` -> ``bias``, ``running_mean`` / ``running_var`` as they are,
    ``moving_mean`` / ``moving_var`` -> ``running_mean`` / ``running_var``. Structural names from
    ``save_parameters`` (``"0.weight"``, ``"body.1.gamma"``) keep their dotted path. Layers whose arrays
    differ (e.g. a BatchNorm's ``num_batches_tracked``, which Gluon has no counterpart for) are described in
    docs/porting-from-mxnet.md.
    """
    out = {}
    suffixes = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean", "moving_var": "running_var"}
    for name in names:
        n = name
        for kind in ("arg:", "aux:"):
            if n.startswith(kind):
                n = n[len(kind):]
        if prefix and n.startswith(prefix):
            n = n[len(prefix):]
        head, sep, last = n.rpartition(".")
        if not sep:
            head, sep, last = n.rpartition("_")
            for suffix in ("running_mean", "running_var", "moving_mean", "moving_var"):
                if n.endswith("_" + suffix) or n == suffix:
                    head, sep, last = n[:-len(suffix) - 1], "_", suffix
        out[name] = (head + "." if head else "") + suffixes.get(last, last)
    return out


# ---------------------------------------------------------------------------------------------- states pickles
#: MXNet 1.9.1's optimizer classes (mxnet.optimizer.optimizer; GroupAdaGrad in .contrib) -> optzoo's names.
_OPTIMIZERS = {"SGD": "sgd", "ccSGD": "sgd", "Signum": "signum", "FTML": "ftml", "LARS": "lars", "LBSGD": "lbsgd",
               "LAMB": "lamb", "DCASGD": "dcasgd", "NAG": "nag", "SGLD": "sgld", "Adam": "adam",
               "AdaGrad": "adagrad", "RMSProp": "rmsprop", "AdaDelta": "adadelta", "Ftrl": "ftrl",
               "Adamax": "adamax", "Nadam": "nadam", "GroupAdaGrad": "groupadagrad", "Test": "test"}
_OPTIMIZER_MODULES = ("mxnet.optimizer.optimizer", "mxnet.optimizer", "mxnet.optimizer.contrib")
_SCHEDULERS = ("LRScheduler", "FactorScheduler", "MultiFactorScheduler", "PolyScheduler", "CosineScheduler")
#: MXNet attributes with no optzoo counterpart in a dump: Gluon's live parameters, a view of the counts (rebuilt
#: from _current_context), and aggregate_num (a class attribute in optzoo; the grouping gives the same values).
_MX_ONLY = {"param_dict", "_index_update_count", "aggregate_num", "allow_np_array"}


class _PickledNDArray:
    """What ``NDArray.__reduce__`` pickles: ``NDArray(None)`` then ``__setstate__({'handle': bytes})``."""

    where = "MXNet states"
    tensor = None

    def __init__(self, *args):
        pass

    def __setstate__(self, state):
        if not (isinstance(state, dict) and set(state) == {"handle"}):
            raise ValueError(f"{self.where} is damaged: a pickled NDArray's state is not {{'handle': bytes}}")
        raw = state["handle"]
        if raw is None:
            return
        if not isinstance(raw, (bytes, bytearray)):
            raise ValueError(f"{self.where} is damaged: a pickled NDArray's handle is a {type(raw).__name__}")
        r = _Reader(bytes(raw), self.where)
        self.tensor = _read_ndarray(r, "a pickled NDArray")
        if r.pos != len(raw):
            raise ValueError(f"{self.where} is damaged: {len(raw) - r.pos} unexpected bytes in a pickled NDArray")


class _PickledObject:
    """An MXNet optimizer or scheduler, as data: its class name and ``__dict__``."""

    kind = "object"
    where = "MXNet states"
    vars = None  # set by __setstate__ (pickle's NEWOBJ does not call __init__)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            raise ValueError(f"{self.where} is damaged: the {self.kind} {self.cls}'s state is not a dict of "
                             "attributes")
        self.vars = dict(state)


def _stub(base, name, where, **extra):
    return type(name, (base,), dict(cls=name, where=where, __module__=__name__, **extra))


class _MXNetUnpickler(pickle.Unpickler):
    """Resolves only the globals MXNet 1.9.1 writes into states files, each to a plain-data stand-in."""

    def __init__(self, file, where):
        super().__init__(file)
        self.where = where
        self.ndarray = _stub(_PickledNDArray, "NDArray", where)

    def find_class(self, module, name):
        if (module, name) == ("mxnet.ndarray.ndarray", "NDArray"):
            return self.ndarray
        if (module, name) == ("builtins", "bytearray"):
            return bytearray
        if module in _OPTIMIZER_MODULES and name in _OPTIMIZERS:
            return _stub(_PickledObject, name, self.where, kind="optimizer")
        if module == "mxnet.lr_scheduler" and name in _SCHEDULERS:
            return _stub(_PickledObject, name, self.where, kind="scheduler")
        raise pickle.UnpicklingError(
            f"{self.where} refers to {module}.{name}, which is not an MXNet 1.9.1 optimizer, scheduler or "
            "NDArray: refused (unpickling it could run code)")


class MXNetStates:
    """A states pickle as data: ``states`` (index -> state: tensors in tuples/lists, or None) and, when the
    optimizer was dumped with them, ``optimizer`` (its MXNet class name), ``optimizer_vars`` (its
    ``__dict__``: hyperparameters, ``num_update``, ``_all_index_update_counts``...), ``scheduler`` and
    ``scheduler_vars``; ``current_context``: the device whose counts the optimizer was using."""

    def __init__(self, states, optimizer=None, optimizer_vars=None, scheduler=None, scheduler_vars=None,
                 current_context=0):
        self.states, self.optimizer, self.optimizer_vars = states, optimizer, optimizer_vars
        self.scheduler, self.scheduler_vars, self.current_context = scheduler, scheduler_vars, current_context

    @property
    def optzoo_name(self):
        return None if self.optimizer is None else _OPTIMIZERS[self.optimizer]


def _plain_state(value, where, index):
    if value is None or isinstance(value, torch.Tensor):
        return value
    if isinstance(value, _PickledNDArray):
        return value.tensor
    if isinstance(value, (tuple, list)):
        return tuple(_plain_state(v, where, index) for v in value)
    raise ValueError(f"{where}: the state of index {index!r} holds a {type(value).__name__}: expected "
                     "NDArrays in tuples or lists")


def _plain_var(value, where, name):
    """An attribute of the optimizer or scheduler as plain data (NDArrays as tensors; no other objects)."""
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return value
    if isinstance(value, _PickledNDArray):
        return value.tensor
    if isinstance(value, (tuple, list)):
        return type(value)(_plain_var(v, where, name) for v in value)
    if isinstance(value, dict):
        return {k: _plain_var(v, where, name) for k, v in value.items()}
    raise ValueError(f"{where}: the optimizer attribute {name!r} holds a {type(value).__name__}: expected "
                     "numbers, strings, containers and NDArrays")


def read_states(blob_or_path) -> MXNetStates:
    """Read a ``Trainer.save_states`` file or ``Updater.get_states`` bytes (with or without
    ``dump_optimizer``) as :class:`MXNetStates`, through the restricted unpickler. A global other than MXNet
    1.9.1's optimizers, schedulers and NDArray is refused (ValueError) before any of it is called."""
    if isinstance(blob_or_path, (bytes, bytearray, memoryview)):
        data, where = bytes(blob_or_path), "MXNet states bytes"
    elif isinstance(blob_or_path, (str, os.PathLike)):
        data, where = _read_bytes(blob_or_path, "MXNet states"), f"MXNet states file {os.fspath(blob_or_path)!r}"
    else:
        raise TypeError(f"states={blob_or_path!r} is invalid: expected bytes (Updater.get_states) or a path "
                        "(Trainer.save_states)")
    if not data:
        raise ValueError(f"{where} is empty")
    if data[:1] != b"\x80":
        raise ValueError(f"{where} is not an MXNet states pickle (it does not start with a pickle protocol "
                         "header): truncated, damaged or another file (a params file? see load_params)")
    try:
        obj = _MXNetUnpickler(io.BytesIO(data), where).load()
    except pickle.UnpicklingError as exc:
        msg = str(exc)
        if msg.startswith(where):
            raise ValueError(msg) from None
        raise ValueError(f"{where} is truncated or damaged: {msg}") from None
    except ValueError:
        raise
    except Exception as exc:  # noqa: BLE001 - what a damaged pickle makes the unpickler raise
        raise ValueError(f"{where} is truncated or damaged ({type(exc).__name__}: {exc})") from None
    optimizer = None
    if isinstance(obj, tuple) and len(obj) == 2 and isinstance(obj[1], _PickledObject):
        obj, optimizer = obj
    if not isinstance(obj, dict):
        raise ValueError(f"{where} holds a {type(obj).__name__}: expected MXNet's states dict (index -> state) "
                         "or the pair (states, optimizer)")
    states = {}
    for index, state in obj.items():
        if isinstance(index, bool) or not isinstance(index, (int, str)):
            raise ValueError(f"{where}: index {index!r} is invalid: expected an int or a str")
        states[index] = _plain_state(state, where, index)
    if optimizer is None:
        return MXNetStates(states)
    if optimizer.kind != "optimizer":
        raise ValueError(f"{where} holds a {optimizer.cls} where the optimizer should be")
    raw = optimizer.vars or {}
    sched, sched_vars = raw.get("lr_scheduler"), None
    if sched is not None:
        if not (isinstance(sched, _PickledObject) and sched.kind == "scheduler"):
            raise ValueError(f"{where}: the optimizer's lr_scheduler is a {type(sched).__name__}: expected an "
                             "mxnet.lr_scheduler scheduler")
        sched_vars = {k: _plain_var(v, where, f"lr_scheduler.{k}") for k, v in sched.vars.items()}
        sched = sched.cls
    counts = raw.get("_all_index_update_counts")
    current = raw.get("_index_update_count")
    context = next((c for c, v in (counts or {}).items() if v is current), None) if isinstance(counts, dict) else None
    if context is None:
        context = next(iter(counts)) if isinstance(counts, dict) and counts else 0
    opt_vars = {k: _plain_var(v, where, k) for k, v in raw.items() if k != "lr_scheduler"}
    return MXNetStates(states, optimizer.cls, opt_vars, sched, sched_vars, context)


# ---------------------------------------------------------------------------------------------- onto optzoo
def _dump(mx_states: MXNetStates, where: str) -> dict:
    """optzoo's ``dump_optimizer`` form of the MXNet optimizer in ``mx_states``."""
    from .optimizer.registry import get_record
    from .optimizer.updater import _UNCHECKED, _init_names
    cls = get_record(mx_states.optzoo_name).cls
    raw = dict(mx_states.optimizer_vars)
    known = set(vars(cls())) | {"_current_context"}
    unknown = sorted(set(raw) - known - _MX_ONLY)
    if unknown:
        raise ValueError(f"{where}: MXNet's {mx_states.optimizer} holds {', '.join(map(repr, unknown))}, which "
                         f"optzoo's {cls.__name__} does not know: not a file of MXNet 1.9.1's {mx_states.optimizer}")
    vars_ = {k: v for k, v in raw.items() if k not in _MX_ONLY}
    vars_["_current_context"] = mx_states.current_context
    kwargs = {k: vars_[k] for k in _init_names(cls) - _UNCHECKED if k in vars_}
    if "lr" in vars_:
        kwargs["learning_rate"] = vars_["lr"]
    scheduler = None
    if mx_states.scheduler is not None:
        scheduler = {"class": mx_states.scheduler, "vars": mx_states.scheduler_vars}
    return {"name": mx_states.optzoo_name, "args": [], "kwargs": kwargs, "scheduler": scheduler, "vars": vars_}


def load_updater_states(updater, blob_or_path) -> None:
    """Load MXNet 1.9.1's ``Updater.get_states`` bytes (or a file of them) into an optzoo ``Updater``.

    With ``dump_optimizer=True`` the optimizer (hyperparameters, update counts, ``num_update``, scheduler and
    its state) replaces the updater's, as MXNet's ``set_states`` does; without it, the states are checked
    against, and kept with, the updater's optimizer. All or nothing: a ValueError leaves the updater as it was.
    """
    from . import _io
    from .optimizer.updater import _FORMAT, Updater
    if not isinstance(updater, Updater):
        raise TypeError(f"updater={updater!r} is invalid: expected an optzoo.optimizer.Updater")
    mx_states = read_states(blob_or_path)
    where = ("MXNet states bytes" if isinstance(blob_or_path, (bytes, bytearray, memoryview))
             else f"MXNet states file {os.fspath(blob_or_path)!r}")
    dump = _dump(mx_states, where) if mx_states.optimizer is not None else None
    blob = {"format": _FORMAT, "owner": None if dump is None else dump["name"],
            "states": {i: s for i, s in mx_states.states.items()}, "optimizer": dump}
    try:
        updater.set_states(_io.dumps(blob))
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def load_trainer_states(trainer, path) -> None:
    """Load a file of MXNet 1.9.1's ``gluon.Trainer.save_states`` into an ``optzoo.Trainer``.

    The trainer must be built over the same parameters in Gluon's order (a dict is sorted by name, as Gluon
    sorts one; names need not match, positions must) and with the same optimizer. Restored: the optimizer's
    hyperparameters, every state (multi-precision master weights included), per-index and per-device update
    counts, ``num_update`` and the scheduler with its state. Kept from the trainer, as Gluon keeps them off
    the file: ``lr_mult`` / ``wd_mult`` and the batch's ``rescale_grad``. Frozen parameters (no state in the
    file) keep their index. All or nothing: a ValueError naming the file leaves the trainer as it was.
    """
    from .optimizer import get_updater
    from .optimizer.updater import dump_optimizer, load_optimizer
    from .trainer import Trainer, _registered_name
    if not isinstance(trainer, Trainer):
        raise TypeError(f"trainer={trainer!r} is invalid: expected an optzoo.Trainer")
    kv = trainer.kvstore
    if kv is not None and kv.update_on_kvstore:
        raise NotImplementedError(f"load_trainer_states with kvstore {kv.type!r}: the store keeps the optimizer "
                                  "states; load the file into a trainer without it")
    where = f"MXNet states file {os.fspath(path)!r}"
    mx_states = read_states(path)
    mine = _registered_name(trainer.optimizer)
    if mx_states.optimizer is not None and mx_states.optzoo_name != mine:
        raise ValueError(f"{where} holds MXNet's {mx_states.optimizer}: this trainer uses "
                         f"{type(trainer.optimizer).__name__}; build it with optimizer={mx_states.optzoo_name!r}")
    dump = _dump(mx_states, where) if mx_states.optimizer is not None else dump_optimizer(trainer.optimizer)
    optimizer = load_optimizer(dump, where=where)
    names, params = trainer._names, trainer._params
    states = {}
    for index, state in mx_states.states.items():
        if not (isinstance(index, int) and 0 <= index < len(params)):
            raise ValueError(f"{where} holds a state of index {index!r}: this trainer has {len(params)} "
                             f"parameters (indices 0 to {len(params) - 1})")
        states[index] = optimizer._adopt_state(index, params[index], state,
                                               f"{where}: the state of index {index} ({names[index]!r})")
    # all checked: commit (as Trainer.load_states, with the trainer's own multipliers)
    optimizer.param_dict = trainer._param_dict
    optimizer._fused = trainer._fused
    trainer._optimizer = optimizer
    trainer._updater = get_updater(optimizer)
    trainer._updater.states = states
    trainer._updater.states_synced = dict.fromkeys(states, True)


# ---------------------------------------------------------------------------------------------- one-off conversion
def convert(params_path, states_path=None, order="sorted"):
    """An MXNet checkpoint as optzoo's: ``(weights, trainer)``: the weights (name -> tensor, ``arg:`` / ``aux:``
    dropped) and, with ``states_path``, an ``optzoo.Trainer`` over them with the MXNet states loaded (write it
    with ``trainer.save_states``), else None. ``order``: the Trainer's parameter order, ``"sorted"`` (Gluon's
    order for ``net.collect_params()``, a dict) or ``"file"`` (the params file's order)."""
    from .trainer import Trainer
    if order not in ("sorted", "file"):
        raise ValueError(f"order={order!r} is invalid: expected 'sorted' or 'file'")
    loaded = load_params(params_path)
    weights = {}
    for name, t in loaded.items():
        short = name[4:] if name.startswith(("arg:", "aux:")) else name
        if t is None:
            raise ValueError(f"MXNet params file {os.fspath(params_path)!r}: {name!r} is an empty NDArray()")
        if short in weights:
            raise ValueError(f"MXNet params file {os.fspath(params_path)!r}: {short!r} appears as arg: and aux:")
        weights[short] = t
    if states_path is None:
        return weights, None
    mx_states = read_states(states_path)
    if mx_states.optimizer is None:
        raise ValueError(f"MXNet states file {os.fspath(states_path)!r} holds no optimizer (Updater.get_states "
                         "without dump_optimizer): convert it with load_updater_states into an Updater you build")
    names = sorted(weights) if order == "sorted" else list(weights)
    tensors = [(n, torch.nn.Parameter(weights[n].clone()) if weights[n].is_floating_point() else weights[n].clone())
               for n in names]
    trainer = Trainer(tensors, mx_states.optzoo_name)
    load_trainer_states(trainer, states_path)
    return weights, trainer
