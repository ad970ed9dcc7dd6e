"""``optzoo.Trainer``: MXNet Gluon's Trainer on PyTorch parameters (MXNet 1.9.1 semantics, reference §6).

It binds named parameters to an optimizer and an :class:`~optzoo.optimizer.Updater`, steps them with
``rescale_grad = 1/batch_size`` and saves / loads everything needed to resume exactly. With a
distributed kvstore (:mod:`optzoo.kvstore`) it sums the gradients of all workers first (``dist_sync``),
votes on signs (Signum under ``dist_sync``), or hands the update to the store (``dist_async``).
"""
from __future__ import annotations

import contextlib

import fnmatch
import itertools
import math
import operator
import numbers
import warnings

import torch

from . import _io
from ._checks import check_number
from ._gc import pausing
from . import kvstore as _kvstore
from .kvstore.signs import vote_update
from .optimizer import Optimizer, create, get_updater
from .optimizer import _tree
from .optimizer.updater import dump_optimizer, load_optimizer

__all__ = ["Trainer"]

_FORMAT = "optzoo.trainer/1"


class _ParamInfo:
    """What the optimizer reads live for one parameter (Gluon's Parameter attributes)."""

    __slots__ = ("name", "lr_mult", "wd_mult")

    def __init__(self, name):
        self.name, self.lr_mult, self.wd_mult = name, 1.0, 1.0


_GRAD, _REQUIRES_GRAD = operator.attrgetter("grad"), operator.attrgetter("requires_grad")


def _named(params):
    """(name, tensor) pairs in Gluon's order: a dict sorted by name, an iterable as given."""
    if isinstance(params, dict):
        items = sorted(params.items())
    else:
        items = list(params)
        if all(isinstance(p, torch.Tensor) for p in items):
            items = [(str(i), p) for i, p in enumerate(items)]
    named, seen = [], set()
    for k, item in enumerate(items):
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)
                and isinstance(item[1], torch.Tensor)):
            raise TypeError(f"params[{k}] is {type(item).__name__}: expected tensors, (name, tensor) pairs "
                            "(model.named_parameters()) or a dict name -> tensor")
        name, p = item
        if id(p) in seen:
            raise ValueError(f"parameter {name!r} appears twice in params: expected each parameter once")
        if any(name == n for n, _ in named):
            raise ValueError(f"parameter name {name!r} appears twice in params: expected unique names")
        seen.add(id(p))
        named.append((name, p))
    if not named:
        raise ValueError("params is empty: expected at least one parameter")
    return named


class Trainer:
    """Applies an optimizer to a set of parameters, as ``mxnet.gluon.Trainer``.

    Parameters
    ----------
    params : iterable of tensors, iterable of (name, tensor) pairs, or dict name -> tensor
        ``model.named_parameters()`` is the usual argument. A dict is ordered by name, as Gluon orders a
        ParameterDict. Names key multipliers and checkpoints; plain tensors are named "0", "1", ....
        Parameters with ``requires_grad=False`` are skipped, as Gluon skips ``grad_req='null'``.
    optimizer : str or Optimizer
        A registered name (created with ``optimizer_params``) or an instance (``optimizer_params`` must then
        be empty).
    optimizer_params : dict, optional
    kvstore : None, 'local', 'device', 'dist_sync', 'dist_device_sync' (alias 'dist_sync_device'), 'dist_async'
        or a :class:`~optzoo.kvstore.KVStore` (``optzoo.kvstore.create(kind, timeout=...)``)
        ``None``/``'local'``/``'device'``: one process, one device, gradients used as they are.
        ``'dist_sync'``: the store is created and every worker's parameters are made rank 0's *here*, at
        construction (MXNet waits for the first step, after a first forward pass on unsynchronised
        weights); each step sums the gradients over all workers (or, for Signum/SignSGD, takes the
        majority vote of the workers' signs). ``'dist_async'``: the store's server applies the optimizer
        (``update_on_kvstore``). See docs/distributed.md. ``'nccl'`` and
        ``'horovod'`` raise NotImplementedError.
    compression_params : dict, optional
        ``{'type': '2bit', 'threshold': 0.5}``: MXNet's 2-bit gradient compression; distributed kvstores only.
    update_on_kvstore : None or bool
        None: decided by the kvstore (True only for ``'dist_async'``). False with ``'dist_async'`` and True
        with ``'dist_sync'`` raise ValueError; ignored without a distributed kvstore.
    fused : None, True or False
        ``None`` (default): the fast path: large parameters are updated in place by a compiled kernel, small
        ones packed into scratch buffers and updated together (bit-exact with the reference path; see
        :mod:`optzoo.optimizer.engine`). ``True``: every update compiled. ``False``: the reference path,
        one eager update per parameter. Parameters and their ``.grad`` stay the caller's tensors.

    ``step(batch_size)`` sets ``rescale_grad = optimizer_rescale_grad / batch_size``: gradients are expected
    *summed* over the batch (``loss.sum().backward()`` or ``reduction='sum'``), as MXNet's losses give them.
    With ``dist_sync`` the gradients are also summed over the workers, so ``batch_size`` is the **total**
    batch of one step, all workers together (``N`` workers each on ``b`` samples: ``step(N*b)``); then
    ``N`` workers equal one process on the whole batch.
    """

    def __init__(self, params, optimizer, optimizer_params=None, kvstore="device", compression_params=None,
                 update_on_kvstore=None, fused=None):
        named = _named(params)
        if fused not in (None, False, True):
            raise ValueError(f"fused={fused!r} is invalid: expected None, True or False")
        optimizer_params = dict(optimizer_params or {})
        if update_on_kvstore not in (None, False, True):
            raise ValueError(f"update_on_kvstore={update_on_kvstore!r} is invalid: expected None or a bool")
        kv = _make_kvstore(kvstore, compression_params)
        if kv is not None and update_on_kvstore is not None and update_on_kvstore != kv.update_on_kvstore:
            raise ValueError(f"update_on_kvstore={update_on_kvstore!r} is invalid with kvstore {kv.type!r}: "
                             f"it {'always' if kv.update_on_kvstore else 'never'} updates on the kvstore")
        self._names = [n for n, _ in named]
        self._params = [p for _, p in named]
        self._index = {n: i for i, n in enumerate(self._names)}
        self._param_dict = {i: _ParamInfo(n) for i, n in enumerate(self._names)}
        if isinstance(optimizer, Optimizer):
            if optimizer_params:
                raise ValueError(f"optimizer_params={optimizer_params!r} must be empty when optimizer is an "
                                 "Optimizer instance: set its hyperparameters on the instance")
            optimizer.param_dict = self._param_dict
        elif isinstance(optimizer, str):
            optimizer = create(optimizer, param_dict=self._param_dict, **optimizer_params)
        else:
            raise TypeError(f"optimizer={optimizer!r} is invalid: expected a registered name or an Optimizer")
        self._optimizer = optimizer
        self._scale = optimizer.rescale_grad
        if kv is not None and self._voting(kv) and getattr(kv, "compression", None) is not None:
            raise ValueError(f"compression_params with {type(optimizer).__name__} under {kv.type!r}: the workers "
                             "already send 1-bit signs; drop compression_params")
        self._kvstore = kv
        self._updater = get_updater(optimizer)
        self._fused = fused
        optimizer._fused = fused
        # Gluon's _fresh_grad: set when backward accumulates into .grad, reset by a step
        self._fresh = [False] * len(self._params)
        self._seen_grad = [None] * len(self._params)
        self._hooks = [p.register_post_accumulate_grad_hook(self._hook(i)) if p.requires_grad else None
                       for i, p in enumerate(self._params)]
        if kv is not None:
            if kv.update_on_kvstore:
                kv.set_optimizer(optimizer)
            kv.init(self._names, self._params)

    def _hook(self, i):
        def mark(_):
            self._fresh[i] = True
        return mark

    # ------------------------------------------------------------------ accessors
    @property
    def optimizer(self) -> Optimizer:
        return self._optimizer

    @property
    def kvstore(self):
        """The distributed store (:class:`~optzoo.kvstore.KVStore`), or None in one process."""
        return self._kvstore

    @property
    def learning_rate(self):
        return self._optimizer.learning_rate

    def set_learning_rate(self, lr):
        """Set the learning rate; raises ``UserWarning`` if a scheduler owns it (as Gluon)."""
        self._optimizer.set_learning_rate(lr)

    @property
    def lr_mult(self) -> dict:
        """name -> learning-rate multiplier (a copy; change it with ``set_lr_mult``)."""
        return {n: self._param_dict[i].lr_mult for i, n in enumerate(self._names)}

    @property
    def wd_mult(self) -> dict:
        """name -> weight-decay multiplier (a copy; change it with ``set_wd_mult``)."""
        return {n: self._param_dict[i].wd_mult for i, n in enumerate(self._names)}

    def set_lr_mult(self, mults: dict) -> None:
        """Set learning-rate multipliers by parameter name or glob pattern, e.g. ``{'*.bias': 2.0}``."""
        self._set_mult("lr_mult", mults)

    def set_wd_mult(self, mults: dict) -> None:
        """Set weight-decay multipliers by name or glob pattern, e.g. ``{'*.bias': 0.0, '*norm*': 0.0}``."""
        self._set_mult("wd_mult", mults)

    def _set_mult(self, attr, mults):
        if not isinstance(mults, dict):
            raise TypeError(f"{attr}={mults!r} is invalid: expected a dict of name or pattern -> float")
        resolved = {}
        for pattern, value in mults.items():
            check_number(f"{attr}[{pattern!r}]", value)  # finite, as the optimizer's own setters
            hits = [i for i, n in enumerate(self._names) if n == pattern or fnmatch.fnmatchcase(n, pattern)]
            if not hits:
                raise KeyError(f"{attr}: {pattern!r} matches no parameter; names are {', '.join(self._names)}")
            resolved.update(dict.fromkeys(hits, float(value)))
        for i, value in resolved.items():
            setattr(self._param_dict[i], attr, value)

    # ------------------------------------------------------------------ stepping
    def _check_batch_size(self, batch_size):
        # inf would make rescale_grad 0: a step that counts and moves momenta without the gradient
        if (isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Real)
                or not math.isfinite(batch_size) or not batch_size > 0):
            raise ValueError(f"batch_size={batch_size!r} is invalid: expected a finite number > 0")

    def step(self, batch_size, ignore_stale_grad=False):
        """One optimizer step on every parameter whose gradient is fresh, with ``rescale_grad = scale/batch_size``
        (``batch_size``: the total over all workers under ``dist_sync``)."""
        self._check_batch_size(batch_size)
        with self._rescaled(batch_size):
            indices = self._fresh_indices(ignore_stale_grad)
            kv = self._kvstore
            if kv is not None and kv.update_on_kvstore:
                if indices:
                    kv.pushpull(indices, [self._params[i] for i in indices], self._optimizer.rescale_grad)
                self._mark_seen(indices)
                return
            if not self._voting(kv) and kv is not None and indices:
                self._allreduce(indices)
            self._update_indices(indices)

    @contextlib.contextmanager
    def _rescaled(self, batch_size):
        """``rescale_grad = scale / batch_size`` for one step; put back as it was if the step fails."""
        before = self._optimizer.rescale_grad
        self._optimizer.rescale_grad = self._scale / batch_size
        try:
            yield
        except BaseException:
            self._optimizer.rescale_grad = before
            raise

    def allreduce_grads(self):
        """Sum gradients across workers (``dist_sync``; nothing to do in one process), for a later
        ``update``. With Signum/SignSGD under ``dist_sync`` the workers exchange signs in ``update``
        instead, and this does nothing."""
        self._no_update_on_kvstore("allreduce_grads")
        kv = self._kvstore
        if kv is not None and not self._voting(kv):
            indices = self._fresh_indices(True)
            if indices:
                self._allreduce(indices)
            for i in indices:  # the sums are fresh for update(), whatever object .grad now is
                self._fresh[i] = True

    def _allreduce(self, indices):
        self._kvstore.allreduce_grads(indices, [self._params[i] for i in indices])

    def update(self, batch_size, ignore_stale_grad=False):
        """The update half of ``step`` (after ``allreduce_grads``, e.g. to clip gradients in between)."""
        self._no_update_on_kvstore("update")
        self._check_batch_size(batch_size)
        with self._rescaled(batch_size):
            self._update_indices(self._fresh_indices(ignore_stale_grad))

    def _no_update_on_kvstore(self, what):
        if self._kvstore is not None and self._kvstore.update_on_kvstore:
            raise RuntimeError(f"Trainer.{what}() is not available with kvstore {self._kvstore.type!r}: it "
                               "updates on the kvstore; call step(batch_size)")

    def _voting(self, kv):
        """Whether the workers exchange signs instead of gradients (an optimizer with a vote split)."""
        return kv is not None and not kv.update_on_kvstore and hasattr(type(self._optimizer), "apply_vote")

    def _fresh_indices(self, ignore_stale_grad):
        """Parameters whose gradient is fresh (on any worker under a sync kvstore); warns about the others."""
        # C-level maps, no Python loop body per parameter (thousands of parameters: ~1 ms a step otherwise)
        params = self._params
        everyone = all(map(_REQUIRES_GRAD, params))
        live = list(range(len(params))) if everyone else \
            list(itertools.compress(range(len(params)), map(_REQUIRES_GRAD, params)))
        grads = list(map(_GRAD, params if everyone else map(params.__getitem__, live)))
        # fresh: a gradient, and either backward's hook saw it accumulate or it is another object than last step's
        fresh = list(map(operator.and_, map(operator.is_not, grads, itertools.repeat(None)),
                         map(operator.or_, map(self._fresh.__getitem__, live),
                             map(operator.is_not, grads, map(self._seen_grad.__getitem__, live)))))
        if self._kvstore is not None:  # and, in the same exchange, which gradients are row-sparse anywhere
            fresh = self._kvstore.agree_grads(fresh, live, grads)
        stale = [] if all(fresh) else [self._names[i] for i, f in zip(live, fresh) if not f]
        if stale and not ignore_stale_grad:
            warnings.warn(f"Gradient of Parameter(s) {', '.join(map(repr, stale))} has not been updated by "
                          "backward since the last `step`; they are not updated. Call step(batch_size, "
                          "ignore_stale_grad=True) to silence this for parameters you leave unused on purpose.",
                          UserWarning, stacklevel=3)
        indices = list(itertools.compress(live, fresh))
        # the gradients read, for this step's update and _mark_seen, where nothing replaces them in between
        # (a kvstore's exchange may)
        self._read = (indices, grads if not stale else list(itertools.compress(grads, fresh))) \
            if self._kvstore is None else None
        return indices

    def _grads_of(self, indices):
        """The gradients of ``indices``: those :meth:`_fresh_indices` read for them, else read now."""
        read = self.__dict__.get("_read")
        if read is not None and read[0] is indices:
            return read[1]
        return list(map(_GRAD, map(self._params.__getitem__, indices)))

    def _mark_seen(self, indices):
        grads = self._grads_of(indices)
        self._read = None  # (the step is over: what it read is not kept)
        if len(indices) == len(self._params):  # every parameter (the common case): new lists
            self._fresh, self._seen_grad = [False] * len(indices), list(grads)
            return
        list(map(self._fresh.__setitem__, indices, itertools.repeat(False)))
        list(map(self._seen_grad.__setitem__, indices, grads))

    @pausing  # thousands of parameters: their small containers never trigger a collection (see _gc)
    def _update_indices(self, indices):
        if self._voting(self._kvstore):
            vote_update(self._kvstore, self._updater, [self._params[i] for i in indices], indices)
            self._mark_seen(indices)
            return
        if indices:
            # (torch.Tensor.detach: Parameter.detach() is 10x slower, through __torch_function__)
            self._updater(indices, self._grads_of(indices),
                          list(map(torch.Tensor.detach, map(self._params.__getitem__, indices))))
        self._mark_seen(indices)

    # ------------------------------------------------------------------ checkpoints
    def save_states(self, fname) -> None:
        """Write optimizer hyperparameters, states, update counts, scheduler state and multipliers, keyed by
        parameter name, atomically (temporary file + rename).

        Under ``dist_sync`` every worker holds the same states (Signum's momenta excepted: each worker keeps
        its own; rank 0's are written): rank 0 writes, the others wait for it. ``dist_async`` saves the
        server's states (if the store can)."""
        kv = self._kvstore
        if kv is not None and kv.update_on_kvstore:
            _store_method(kv, "save_optimizer_states", "save_states")(fname)
            return
        if kv is None or kv.rank == 0:
            self._save_local(fname)
        if kv is not None:
            kv.barrier()

    def _save_local(self, fname):
        names = self._names
        blob = {
            "format": _FORMAT,
            "optimizer": dump_optimizer(self._optimizer),
            "names": list(names),
            "params": {n: {"shape": list(p.shape), "dtype": str(p.dtype).replace("torch.", ""),
                           "lr_mult": self._param_dict[i].lr_mult, "wd_mult": self._param_dict[i].wd_mult}
                       for i, (n, p) in enumerate(zip(names, self._params))},
            "states": {names[i]: _tree.to_plain(s) for i, s in self._updater.states.items()},
        }
        _io.atomic_save(blob, fname, "trainer states")

    def load_states(self, fname) -> None:
        """Load ``save_states`` output. Everything is checked first: on any mismatch (another optimizer, other
        names, shapes or dtypes, a damaged file) a clear error is raised and the trainer is unchanged.
        Under ``dist_sync`` every worker reads the file (it must be readable on every machine)."""
        kv = self._kvstore
        if kv is not None and kv.update_on_kvstore:
            _store_method(kv, "load_optimizer_states", "load_states")(fname)
            return
        blob = _io.safe_load(fname, _FORMAT, "trainer states")
        where = f"trainer states file {fname!r}"
        _check_layout(blob, where)
        mine = type(self._optimizer).__name__
        saved_opt = blob["optimizer"]["name"]
        if saved_opt != _registered_name(self._optimizer):
            raise ValueError(f"{where} holds optimizer {saved_opt!r}: this trainer uses {mine}")
        saved = blob["params"]
        if set(saved) != set(self._names):
            missing, extra = sorted(set(self._names) - set(saved)), sorted(set(saved) - set(self._names))
            raise ValueError(f"{where} is for other parameters: missing {missing}, unexpected {extra}")
        for i, (n, p) in enumerate(zip(self._names, self._params)):
            if saved[n]["shape"] != list(p.shape) or saved[n]["dtype"] != str(p.dtype).replace("torch.", ""):
                raise ValueError(f"{where}: parameter {n!r} was saved with shape "
                                 f"{tuple(saved[n]['shape'])} and dtype {saved[n]['dtype']}; it now has "
                                 f"{tuple(p.shape)} and {p.dtype}")
            for attr in ("lr_mult", "wd_mult"):
                try:
                    check_number(f"{attr}[{n!r}]", saved[n][attr])
                except ValueError as exc:
                    raise ValueError(f"{where}: {exc}") from None
        # indices are positions: remap the saved ones onto this trainer's order by name
        remap = {blob["names"].index(n): i for i, n in enumerate(self._names)}
        optimizer = load_optimizer(_remap_indices(blob["optimizer"], remap), where=where)
        states = {}
        for n, s in blob["states"].items():
            if n not in self._index:
                raise ValueError(f"{where} holds a state of {n!r}, which is not a parameter of this trainer")
            i = self._index[n]
            p = self._params[i]
            states[i] = optimizer._adopt_state(i, p, s, f"{where}: the state of {n!r}")
        # all checked: commit
        optimizer.param_dict = self._param_dict
        for n, info in saved.items():
            self._param_dict[self._index[n]].lr_mult = float(info["lr_mult"])
            self._param_dict[self._index[n]].wd_mult = float(info["wd_mult"])
        optimizer._fused = self._fused
        self._optimizer = optimizer
        self._updater = get_updater(optimizer)
        self._updater.states = states
        self._updater.states_synced = dict.fromkeys(states, True)


def _check_layout(blob, where):
    """The entries ``_save_local`` writes, with their types: a ValueError starting with ``where`` otherwise (a
    file that passes the digest but was written by hand or by another version, never a bare KeyError)."""
    def bad(what):
        raise ValueError(f"{where} is malformed: {what}")

    for key, kind in (("optimizer", dict), ("names", list), ("params", dict), ("states", dict)):
        if not isinstance(blob.get(key), kind):
            bad(f"its {key!r} entry is missing or not a {kind.__name__}")
    names, params = blob["names"], blob["params"]
    if not all(isinstance(n, str) for n in names) or len(set(names)) != len(names) or set(names) != set(params):
        bad("its 'names' are not the unique names of its 'params'")
    for n, info in params.items():
        if not (isinstance(info, dict) and {"shape", "dtype", "lr_mult", "wd_mult"} <= set(info)
                and isinstance(info["shape"], list) and isinstance(info["dtype"], str)):
            bad(f"the entry of parameter {n!r} is not a shape, a dtype and two multipliers")
    if not isinstance(blob["optimizer"].get("name"), str) or not isinstance(blob["optimizer"].get("vars"), dict):
        bad("its optimizer has no name or no vars")
    if not set(blob["states"]) <= set(params):
        bad(f"it holds states of {sorted(set(blob['states']) - set(params))}, which have no parameter entry")


def _make_kvstore(kvstore, compression_params):
    """The distributed store for the ``kvstore`` argument, or None for the one-process kinds."""
    if isinstance(kvstore, _kvstore.KVStore):
        if compression_params is not None:
            raise ValueError("compression_params with a KVStore instance: set it on the store, "
                             "optzoo.kvstore.create(kind, compression_params=...)")
        return kvstore
    kind = _kvstore.normalize(kvstore)
    if kind not in _kvstore.DIST_KINDS:
        if compression_params is not None:
            raise ValueError(f"compression_params={compression_params!r}: gradient compression needs a "
                             "distributed kvstore ('dist_sync', 'dist_device_sync', 'dist_async')")
        return None
    if compression_params is None:
        return _kvstore.create(kind)
    if kind == "dist_async":
        raise NotImplementedError("compression_params with kvstore='dist_async': optzoo compresses gradients "
                                  "only under 'dist_sync' and 'dist_device_sync'")
    return _kvstore.create(kind, compression_params=compression_params)


def _store_method(kv, method, caller):
    """The store's ``method`` for ``Trainer.<caller>`` when the optimizer states live on the store."""
    if not hasattr(kv, method):
        raise NotImplementedError(f"{caller} with kvstore {kv.type!r}: this store keeps the optimizer states "
                                  f"and has no {method}()")
    return getattr(kv, method)


def _registered_name(opt):
    from .optimizer.registry import records
    return next((r.name for r in records() if r.cls is type(opt)), type(opt).__name__.lower())


def _remap_indices(dump, remap):
    """Rewrite the per-index bookkeeping of an optimizer dump (dicts keyed by int index) onto new indices."""
    def by_index(d):
        return {remap.get(k, k) if isinstance(k, int) else k: v for k, v in d.items()}

    out = dict(dump)
    out["vars"] = dict(dump["vars"])
    for key, value in dump["vars"].items():
        if key == "_all_index_update_counts":
            out["vars"][key] = {ctx: by_index(counts) for ctx, counts in value.items()}
        elif isinstance(value, dict) and value and all(isinstance(k, int) for k in value):
            out["vars"][key] = by_index(value)
    return out
