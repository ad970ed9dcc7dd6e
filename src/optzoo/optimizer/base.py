"""The Optimizer base class: all of MXNet 1.9.1's bookkeeping, none of the math.

An optimizer subclass holds its hyperparameters, its state layout (``create_state``) and its update
rule (``rule``), written in the symbols of its docstring. Everything else lives here:
learning-rate and weight-decay multipliers, per-index update counts, the scheduler, multi-precision
master copies, list (aggregated) calls and input checks.

A custom optimizer (the tutorial's "Custom Optimizer" section) may instead override ``update``
directly, as in MXNet; it then gets the multi-precision wrapper and the Updater for free.
"""
from __future__ import annotations

import itertools
import operator
import warnings

import torch

from .._gc import pausing
from .._checks import (check_bool, check_distinct_weights, check_nonnegative, check_number, check_optional_clip,
                       check_positive_int, check_tensor_pair, plain, plain_pairs)
from . import _sparse, _tree, engine
from ._numerics import in_dtype, mx_param

__all__ = ["Optimizer", "LOW_PRECISION"]

#: dtypes that get an fp32 master copy under ``multi_precision=True`` (MXNet: fp16 only).
LOW_PRECISION = (torch.float16, torch.bfloat16)
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class Optimizer:
    r"""Base class of every optimizer, with MXNet 1.9.1's constructor and behaviour.

    Parameters
    ----------
    rescale_grad : float, default 1
        Every gradient is multiplied by this first (``rg``); the Trainer sets it to ``1/batch_size``.
    param_idx2name : dict of int -> str, optional
        Names of parameter indices. When given, indices whose name ends neither in ``_weight`` nor in
        ``_gamma`` get ``wd_mult = 0`` (MXNet's Module rule), and multipliers may be keyed by name.
    wd : float, default 0
        Weight decay ``wd``; where it enters the update is given in each optimizer's formula.
    clip_gradient : float, optional
        Clip the (rescaled) gradient to ``[-c, c]``. None or 0 disable clipping; negative is an error.
    learning_rate : float, optional
        ``lr``. Defaults to 0.01 when no ``lr_scheduler`` is given. With a scheduler, a different value
        overwrites the scheduler's ``base_lr`` (with a warning), as in MXNet.
    lr_scheduler : callable, optional
        ``lr = lr_scheduler(num_update)``; see :mod:`optzoo.lr_scheduler`.
    sym : object, optional
        Accepted for MXNet compatibility and ignored (there are no symbols in PyTorch).
    begin_num_update : int, default 0
        The update count an index starts from; its first update has ``t = begin_num_update + 1``.
    multi_precision : bool, default False
        Keep an fp32 master copy (and fp32 states) for float16 and bfloat16 weights.
    param_dict : dict of int -> object, optional
        Objects with ``lr_mult`` and ``wd_mult`` attributes (Gluon parameters), read live at every step;
        they take priority over ``set_lr_mult`` / ``set_wd_mult``.
    """

    #: Registry capabilities of this class (see ``optzoo.optimizer.registry``).
    capabilities: frozenset = frozenset({"multi_precision"})
    #: LBSGD reads the learning rate before counting the update (so its scheduler sees 0, 1, 2, ...).
    _lr_before_count = False
    #: MXNet's ``Test`` optimizer does not count updates.
    _counts_updates = True
    #: Multi-precision layout: ``(w32, state)`` (MXNet's generic wrapper) or ``(state, w32)`` (SGD, NAG, LARS).
    _mp_master_first = True
    #: How many parameters the Updater hands to one ``update`` call (MXNet's aggregate_num).
    aggregate_num = 0
    #: The class whose ``create_state`` made a state (set for every subclass defining one).
    _state_owner = None
    #: The executor's record of this class (see :mod:`optzoo.optimizer.engine`): the kernel takes per-tensor
    #: sums (``sum_sq_of``), so packed parameters run as rows of equal-sized parameters (LARS, LAMB).
    _segment_kernel = False
    #: The kernel is ``second_phase(w, *first_phase(w, g, state, s, seg))``: the direction and the states, then the
    #: weight (LAMB). On the CPU, large tensors run the phases as two compiled loops with the direction stored
    #: between them (see :mod:`optzoo.optimizer._phases`).
    _two_phase = False
    #: The kernel takes what ``_draw(weight, lr)`` gives (a noise key or tensor), per index in index order, as its
    #: last scalar (SGLD), so that every path makes the same draws; ``_draw_all(weights, lrs, indices)`` makes a
    #: list's draws, the same as ``_draw`` index by index.
    _kernel_noise = False
    #: The instance attributes that ``kernel`` reads (a compiled graph is specialized on their values): the
    #: executor calls a compiled graph directly only while these keep the values of the call that dynamo ran
    #: (see :mod:`optzoo.optimizer._direct`); a test checks every kernel against this.
    _kernel_reads = ("clip_gradient",)
    #: A list is read index by index even when the counts agree (LBSGD reads its lr before counting).
    _reads_per_index = False
    #: MXNet's aggregated ``_update_impl`` counts a whole call, then reads the lr once, even when the indices'
    #: counts differ (SGD, LARS; LAMB reads per index).
    _counts_call_at_once = False
    #: ``prepare`` advances per-index Python state (Nadam's shared schedule, LARS's lr pairs): it is called
    #: once per index, in index order, never shared between indices with the same ``(lr, wd, t)``.
    _prepare_advances = False
    #: The Python state that steps advance (besides the per-index counts), saved by the torch face in its
    #: param groups: each optimizer adds its own (Nadam's shared schedule, LARS's last lr, LBSGD's sums).
    _step_vars = ("num_update",)
    #: How ``update`` runs the rule (set by the Trainer and the torch face from their ``fused``): None, the
    #: fast path (compiled where it pays, bit-exact); True, every call compiled; False, the reference path
    #: (``rule`` per tensor).
    _fused = None

    def __new__(cls, *args, **kwargs):
        self = super().__new__(cls)
        # The constructor call, kept so an optimizer can be rebuilt from a safe (non-pickle) dump: numpy
        # scalars read as Python values (the constructor refuses what stays unreadable).
        self._init_args = (tuple(_plain_arg(a) for a in args), {k: _plain_arg(v) for k, v in kwargs.items()})
        return self

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "create_state" in cls.__dict__:
            cls._state_owner = cls.__name__
            create = cls.__dict__["create_state"]

            def create_state(self, index, weight, _create=create, _owner=cls.__name__):
                return _tree.tag(_create(self, index, weight), _owner)

            create_state.__doc__ = create.__doc__
            create_state.__wrapped__ = create
            cls.create_state = create_state

    def __init__(self, rescale_grad=1.0, param_idx2name=None, wd=0.0, clip_gradient=None,
                 learning_rate=None, lr_scheduler=None, sym=None, begin_num_update=0,
                 multi_precision=False, param_dict=None, **kwargs):
        if kwargs:
            name = next(iter(kwargs))
            raise TypeError(f"{type(self).__name__}() got an unexpected keyword argument {name!r}")
        # Every argument is checked (a subclass checks its own before calling this) before the one change
        # outside the optimizer, the scheduler's base_lr, made last.
        rescale_grad = check_number("rescale_grad", rescale_grad)
        wd = check_number("wd", wd)
        clip_gradient = check_optional_clip("clip_gradient", clip_gradient)
        learning_rate = check_nonnegative("learning_rate", learning_rate, allow_none=True)
        if lr_scheduler is not None and not callable(lr_scheduler):
            raise TypeError(f"lr_scheduler={lr_scheduler!r} is invalid: expected a callable of num_update")
        if param_idx2name is not None and not isinstance(param_idx2name, dict):
            raise TypeError(f"param_idx2name={param_idx2name!r} is invalid: expected a dict of index -> name")
        idx2name = {_plain_arg(k): _plain_arg(v) for k, v in (param_idx2name or {}).items()}
        for key, name in idx2name.items():
            if not isinstance(name, str):
                raise TypeError(f"param_idx2name[{key!r}]={name!r} is invalid: expected a parameter name (str)")
        begin_num_update = check_positive_int("begin_num_update", begin_num_update, minimum=0)
        multi_precision = check_bool("multi_precision", multi_precision)
        if param_dict is not None and not isinstance(param_dict, dict):
            raise TypeError(f"param_dict={param_dict!r} is invalid: expected a dict of index -> parameter")

        self.rescale_grad = rescale_grad
        self.lr_scheduler = lr_scheduler
        if lr_scheduler is None and learning_rate is None:
            learning_rate = 0.01
        self.lr = learning_rate
        self.wd = wd
        self.lr_mult = {}
        self.wd_mult = {}
        self.begin_num_update = begin_num_update
        self.num_update = begin_num_update
        self._all_index_update_counts = {0: {}}
        self._current_context = 0
        self._index_update_count = self._all_index_update_counts[0]
        self.clip_gradient = clip_gradient
        self.multi_precision = multi_precision
        self.idx2name = idx2name
        self.sym_info = ()
        self.param_dict = param_dict if param_dict is not None else {}
        self.set_lr_mult({})
        self.set_wd_mult({})
        if lr_scheduler is not None and learning_rate is not None and lr_scheduler.base_lr != learning_rate:
            # MXNet overwrites only base_lr: warmup_final_lr and Poly/Cosine base_lr_orig keep the old value.
            warnings.warn("learning rate from ``lr_scheduler`` has been overwritten by "
                          "``learning_rate`` in optimizer.", UserWarning, stacklevel=2)
            lr_scheduler.base_lr = learning_rate

    # ------------------------------------------------------------------ learning rate and multipliers
    @property
    def learning_rate(self):
        """The current base learning rate: ``lr_scheduler(num_update)`` if a scheduler is set, else ``lr``."""
        if self.lr_scheduler is not None:
            return self.lr_scheduler(self.num_update)
        return self.lr

    def set_learning_rate(self, lr):
        """Set the base learning rate; raises ``UserWarning`` when a scheduler owns it (as MXNet)."""
        if self.lr_scheduler is not None:
            raise UserWarning("LRScheduler of the optimizer has already been defined. Note that "
                              "set_learning_rate can mutate the value of the learning rate of the optimizer "
                              "only when the LRScheduler of the optimizer is undefined.")
        self.lr = check_nonnegative("lr", lr)

    def set_lr_scale(self, args_lrscale):  # pragma: no cover - MXNet raises too
        raise DeprecationWarning("set_lr_scale is deprecated: use set_lr_mult")

    def set_lr_mult(self, args_lr_mult):
        """Per-parameter learning-rate multipliers, keyed by index or (with ``param_idx2name``) name."""
        self.lr_mult = _checked_mults("lr_mult", args_lr_mult)

    def set_wd_mult(self, args_wd_mult):
        """Per-parameter weight-decay multipliers.

        When ``param_idx2name`` was given, every name not ending in ``_weight`` or ``_gamma`` first gets
        0 (no decay on biases, BatchNorm beta and moving statistics); ``args_wd_mult`` is applied last.
        """
        mults = _checked_mults("wd_mult", args_wd_mult)
        self.wd_mult = {}
        for name in self.idx2name.values():
            if not (name.endswith("_weight") or name.endswith("_gamma")):
                self.wd_mult[name] = 0.0
        self.wd_mult.update(mults)

    def _set_current_context(self, device_id):
        """Update counts are kept per device, as MXNet keeps them per context."""
        if device_id not in self._all_index_update_counts:
            self._all_index_update_counts[device_id] = {}
        self._current_context = device_id
        self._index_update_count = self._all_index_update_counts[device_id]

    def _update_count(self, index):
        """Count one update of each index: ``t = count[index]``, ``num_update = max over indices``."""
        indices = index if isinstance(index, (list, tuple)) else [index]
        counts, begin = self._index_update_count, self.begin_num_update
        if len(indices) > 8 and len(set(indices)) == len(indices):  # C-level maps, no loop body per index
            new = list(map(operator.add, map(counts.get, indices, _repeat(begin)), _repeat(1)))
            counts.update(zip(indices, new))
            self.num_update = max(self.num_update, max(new))
            return
        for idx in indices:
            counts[idx] = counts.get(idx, begin) + 1
        if indices:  # counts only grow: the max over the list is MXNet's running max
            self.num_update = max(self.num_update, max(counts[idx] for idx in indices))

    def _multiplied(self, base, indices, attr, mults):
        values = [base] * len(indices)
        if not (self.param_dict or mults or self.idx2name):  # no multipliers at all (the torch face)
            return values
        pd = self.param_dict
        if len(pd) >= len(indices):  # the Trainer's: every index in param_dict, which comes first (C-level maps)
            try:
                return list(map(operator.mul, values, map(operator.attrgetter(attr), map(pd.__getitem__, indices))))
            except (KeyError, TypeError):  # an index that is not there (or not hashable): one by one
                pass
        for k, index in enumerate(indices):
            if index in self.param_dict:
                values[k] *= getattr(self.param_dict[index], attr)
            elif index in mults:
                values[k] *= mults[index]
            elif index in self.idx2name:
                values[k] *= mults.get(self.idx2name[index], 1.0)
        return values

    def _get_lrs(self, indices):
        base = self.lr_scheduler(self.num_update) if self.lr_scheduler is not None else self.lr
        return self._multiplied(base, indices, "lr_mult", self.lr_mult)

    def _get_lr(self, index):
        return self._get_lrs([index])[0]

    def _get_wds(self, indices):
        return self._multiplied(self.wd, indices, "wd_mult", self.wd_mult)

    def _get_wd(self, index):
        return self._get_wds([index])[0]

    # ------------------------------------------------------------------ gradient preprocessing
    def _clip(self, x):
        """``clip(x) = min(max(x, -c), c)`` when ``clip_gradient`` is set.

        ``c`` is the value MXNet's kernels clip to: an fp32 operator parameter in the tensor's dtype.
        """
        if self.clip_gradient:
            c = self._clip_bounds()[x.dtype]
            return x.clamp(-c, c)
        return x

    def _clip_bounds(self):
        """``c`` per floating dtype, made once per ``clip_gradient`` value and outside compiled kernels (the
        executor calls this first), which read it as a constant: parsing it while dynamo traces breaks the
        graph (torch 2.13)."""
        memo = self.__dict__.get("_clip_memo")
        if memo is None or memo[0] != self.clip_gradient:
            memo = self._clip_memo = (self.clip_gradient, {dt: mx_param(self.clip_gradient, dt) for dt in _FLOATS})
        return memo[1]

    def _rescaled_clipped(self, g, scale=None):
        """``clip(rg * g)``: MXNet's kernels always rescale first, then clip.

        ``rg`` is the fused kernels' fp32 parameter. With ``scale`` (a kernel scalar such as ``lr``):
        ``scale * clip(rg * g)``, in the SGD-family kernels' order, which compute ``(scale * rg) * g``
        when there is no clipping.
        """
        rg = mx_param(self.rescale_grad, g.dtype)
        if scale is None:
            return self._clip(g * rg)
        if self.clip_gradient:
            return scale * self._clip(rg * g)
        return in_dtype(scale * rg, g.dtype) * g

    # ------------------------------------------------------------------ states
    def create_state(self, index, weight):
        """The state of one parameter (tensors on the weight's device, MXNet's layout); None if stateless."""
        return None

    def _mp(self, weight):
        return self.multi_precision and weight.dtype in LOW_PRECISION

    def create_state_multi_precision(self, index, weight):
        """Like ``create_state``, plus an fp32 master copy for fp16/bf16 weights under ``multi_precision``.

        Layout: ``(w32, state)``; SGD, NAG and LARS use ``(state, w32)`` as MXNet's fused ``mp_*`` kernels do.
        """
        if self._mp(weight):
            w32 = weight.detach().to(torch.float32, copy=True)
            inner = self.create_state(index, w32)
            return (w32, inner) if self._mp_master_first else (inner, w32)
        if weight.dtype in LOW_PRECISION and not self.multi_precision and weight.device.type != "meta":
            # (not for the executor's probes of a state's layout, on meta tensors: one warning per real state's
            # place, as MXNet's, instead of the same one from three places of a torch-face optimizer's first step)
            warnings.warn(f"Accumulating with {weight.dtype} in optimizer can lead to poor accuracy or "
                          "slow convergence. Consider using multi_precision=True option of the optimizer",
                          UserWarning, stacklevel=2)
        return self.create_state(index, weight)

    def _split_mp(self, state):
        return (state[0], state[1]) if self._mp_master_first else (state[1], state[0])

    # ------------------------------------------------------------------ updates
    def prepare(self, *, lr, wd, t, index, dtype):
        """The per-step scalars of the rule (a tuple of Python numbers), from the per-index ``lr``, ``wd`` and
        update count ``t``, for tensors of ``dtype``: the Python half of an MXNet update."""
        raise NotImplementedError

    def _memo(self, key, make):
        """``make()``, remembered by ``key``: prepare's scalars, the same for most indices of a step, are
        computed once (the key must hold every input, hyperparameters included)."""
        memo = self.__dict__.setdefault("_prepared", {})
        s = memo.get(key)
        if s is None:
            if len(memo) >= 4096:  # keys hold lr, wd or t: schedules and counts make new ones every step
                memo.clear()
            s = memo[key] = make()
        return s

    def kernel(self, w, g, state, s, seg=None):
        """The tensor half of the rule: ``(new_w, new_state)`` from ``s = prepare(...)``; never mutates.

        It runs per tensor (``seg`` None, ``s`` Python numbers) or over a whole contiguous pack of
        parameters (``seg`` None; each ``s[k]`` a number or a
        per-element tensor), or over a run of equal-sized parameters viewed as ``[k, n]`` rows (``seg``
        :data:`~optzoo.optimizer._numerics.ROWS`; each ``s[k]`` a number or a ``[k, 1]`` column), eagerly or
        compiled: elementwise ops, ``_numerics.sum_sq_of`` for per-tensor norms, no Python branches on tensor
        values or on ``s``.
        """
        raise NotImplementedError

    def rule(self, weight, grad, state, *, lr, wd, t, index):
        """The update rule: returns ``(new_weight, new_state)`` (None for "unchanged"); never mutates.

        By default ``kernel(w, g, state, prepare(...))``; an optimizer may override it whole instead
        (then it has no fast path).
        """
        if not self.has_kernel():
            raise NotImplementedError(f"{type(self).__name__} defines neither rule() nor update()")
        s = self.prepare(lr=lr, wd=wd, t=t, index=index, dtype=weight.dtype)
        return self.kernel(weight, grad, state, s)

    @classmethod
    def has_kernel(cls) -> bool:
        """Whether the rule is split into ``prepare`` + ``kernel`` (what the fast path executes)."""
        return cls.kernel is not Optimizer.kernel and cls.rule is Optimizer.rule

    def _has_fast_path(self) -> bool:
        """Whether the executor may run this instance's ``prepare`` + ``kernel`` instead of ``rule`` (a class
        that overrides ``rule`` may say yes for the settings where its rule is exactly that split)."""
        return type(self).has_kernel()

    @pausing  # a list of thousands of parameters: its small containers never trigger a collection (see _gc)
    def update(self, index, weight, grad, state):
        """Update ``weight`` in place from ``grad`` and ``state`` (lists allowed, MXNet's aggregated form).

        Every input is checked before anything is modified, and an error while the scalars are prepared
        leaves the counts and the optimizer's bookkeeping as they were. A list is one MXNet call: when its
        indices' counts agree it is counted, then read, as a whole (equal to one call per index except for
        LARS's momentum correction, which MXNet applies to every index of a call); SGD and LARS always
        count the whole call first, as MXNet's aggregated kernels do; other optimizers with unequal counts
        read index by index, in list order.

        A gradient may be row-sparse (``torch.sparse_coo`` with ``sparse_dim == 1`` over the weight's rows,
        repeated rows summed) where the optimizer's :meth:`sparse_mode` takes it: counted and read as a dense
        one, then updated lazily (:meth:`lazy_rule`, only its rows) or by the dense rule (:meth:`standard_rule`).
        """
        indices, weights, grads, states = _as_lists(index, weight, grad, state)
        held = self._checks_hold("update", indices, weights, grads, states)
        if not held:
            for i, w, g, s in zip(indices, weights, grads, states):
                check_tensor_pair(i, w, g)
                self._check_state(i, w, s)
            self._checks_passed("update", indices, weights, grads, states)
        self._check_distinct(held, indices, weights)
        self._step_lists(indices, weights, grads, states)

    def _step_lists(self, indices, weights, grads, states, chunks=None, lows=None):
        """Count, read and prepare every index (all-or-nothing), then run the rule over the tensors.

        ``chunks``: the positions of each MXNet call the list stands for (the Updater's lists of
        ``aggregate_num``), read call by call; the tensors then run together. Default: one call.
        ``lows``: per index, the fp16/bf16 weight that gets a copy of the updated fp32 master (``weights``),
        or None; gradients may then be in the low dtype (widened where the kernel reads them)."""
        _check_dense(indices, weights, lows)
        if not all(map(_is, map(_LAYOUT, grads), _repeat(torch.strided))):
            return self._step_sparse(indices, weights, grads, states, chunks, lows)
        shards = self.__dict__.get("_shards")  # local shards of sharded parameters: sums over every shard
        fast = ((self._fused is not False or bool(shards)) and self._has_fast_path()
                and len(set(indices)) == len(indices))
        if fast:
            scalars = self._fast_scalars(indices, weights, chunks)
            engine.execute(self, self._fused, weights, grads, states, scalars,
                           [shards.get(i) for i in indices] if shards else None, lows)
            return
        saved = self._bookkeeping()
        try:
            reads = self._reads_for(indices, chunks)
        except BaseException:
            self._restore(saved)
            raise
        with torch.no_grad():
            for i, w, g, s, read in zip(indices, weights, grads, states, reads):
                self._apply(self.rule, i, w, g, s, read)
            pairs = [(low, w) for low, w in zip(lows or (), weights) if low is not None]
            if pairs:
                torch._foreach_copy_([low for low, _ in pairs], [w for _, w in pairs])

    def _fast_scalars(self, indices, weights, chunks=None):
        """The fast path's per-index scalars (all-or-nothing): every index counted and read (MXNet call by call,
        ``chunks``), ``prepare`` in index order, a stochastic rule's draws as each index's last scalar. On an
        error the counts and the bookkeeping are as before. ``weights`` are read for their dtypes and shapes
        only (parameters themselves may be passed)."""
        saved = self._bookkeeping()
        try:
            reads = self._reads_for(indices, chunks)
            scalars = self._prepare_all(indices, weights, reads)
            if self._kernel_noise:  # the draws, in index order, as each index's last scalar
                draws = self._draw_all(weights, [lr for lr, _, _ in reads], indices)
                scalars = [tuple(s) + (d,) for s, d in zip(scalars, draws)]
        except BaseException:
            self._restore(saved)
            raise
        return scalars

    # ------------------------------------------------------------------ row-sparse gradients
    def sparse_mode(self, index, multi_precision):
        """How a row-sparse gradient updates index ``index`` (``multi_precision``: on an fp32 master copy):
        ``"lazy"`` (only the gradient's rows of the weight and of every state change, by :meth:`lazy_rule`),
        ``"standard"`` (the dense rule, absent rows as zero gradient) or None (refused). MXNet 1.9.1's choice
        per optimizer; may raise a ValueError naming the index for settings MXNet's sparse kernel refuses.
        By default ``"standard"``: MXNet's storage fallback, which runs every dense kernel on the densified
        gradient; an optimizer with a lazy (row-sparse) kernel overrides this, and the registry lists it as
        ``"sparse"``."""
        return "standard"

    def lazy_rule(self, weight, grad, state, *, lr, wd, t, index):
        """The lazy update of the gathered rows (``weight``, ``state``: the gradient's rows; ``grad``: its
        coalesced values): ``(new_rows, new_state_rows)``. By default :meth:`lazy_kernel` with
        :meth:`lazy_prepare`'s scalars (the dense rule on those rows unless the optimizer says otherwise); an
        optimizer without that split (or whose lazy update needs more than the rows) overrides this."""
        if not type(self).has_kernel():
            return self.rule(weight, grad, state, lr=lr, wd=wd, t=t, index=index)
        s = self.lazy_prepare(lr=lr, wd=wd, t=t, index=index, dtype=weight.dtype)
        return self.lazy_kernel(weight, grad, state, s)

    def lazy_prepare(self, *, lr, wd, t, index, dtype):
        """The scalars of a lazy update: :meth:`prepare`'s by default (MXNet's sparse kernel computes as the
        dense one); an optimizer whose row-sparse kernel reads other parameters overrides it."""
        return self.prepare(lr=lr, wd=wd, t=t, index=index, dtype=dtype)

    def lazy_kernel(self, w, g, state, s, seg=None):
        """The lazy update of the gathered rows from :meth:`lazy_prepare`'s scalars: :meth:`kernel` by default
        (an optimizer overrides it where MXNet's row-sparse kernel rounds differently). Pure tensor code, as
        ``kernel``: the executor compiles it with the gather and the scatter around it for large row sets."""
        return self.kernel(w, g, state, s, seg)

    def sparse_lr(self, index, weight, values, lr, wd):
        """The learning rate of a row-sparse update of index ``index``: ``lr`` (read as for a dense gradient)
        by default. An optimizer whose rate depends on the whole weight (LARS's trust ratio) computes it here
        from ``weight`` (the whole weight as the caller holds it: the low-precision one under
        multi-precision) and ``values`` (the gradient's coalesced rows)."""
        return lr

    def standard_rule(self, weight, grad, state, *, lr, wd, t, index):
        """The standard update from a row-sparse gradient (``grad``: densified, absent rows 0): by default the
        dense rule (MXNet's storage fallback); an optimizer overrides it where MXNet's sparse kernel rounds
        differently."""
        return self.rule(weight, grad, state, lr=lr, wd=wd, t=t, index=index)

    def _step_sparse(self, indices, weights, grads, states, chunks, lows):
        """``_step_lists`` with row-sparse gradients among ``grads``: the same counts and reads, every input
        checked first, then each index by its :meth:`sparse_mode` (dense gradients by the rule), one by one
        (the fast-path executor takes dense gradients only)."""
        modes = []
        for k, (i, g) in enumerate(zip(indices, grads)):
            if g.layout is torch.strided:
                modes.append(None)
                continue
            mode = self.sparse_mode(i, bool(lows) and lows[k] is not None)
            if mode not in ("lazy", "standard"):
                raise TypeError(f"grad for index {i!r} is row-sparse: {type(self).__name__} does not support "
                                "row-sparse gradients; pass a dense gradient (grad.to_dense())")
            modes.append(mode)
        saved = self._bookkeeping()
        try:
            reads = self._reads_for(indices, chunks)
        except BaseException:
            self._restore(saved)
            raise
        with torch.no_grad():
            for k, (i, w, g, s, mode, (lr, wd, t)) in enumerate(zip(indices, weights, grads, states, modes, reads)):
                low = lows[k] if lows else None
                if mode is not None:
                    rows, values = _sparse.rows_of(g)
                    if mode == "lazy" and not rows.numel():  # counted, nothing to change
                        continue
                    lr = self.sparse_lr(i, w if low is None else low, values, lr, wd)
                if mode == "lazy":
                    if values.numel() >= engine.LARGE and self._compiles_lazy():  # gather, kernel, scatter: one loop
                        s_lazy = self.lazy_prepare(lr=lr, wd=wd, t=t, index=i, dtype=w.dtype)
                        engine.execute_rows(self, w, rows, values, s, s_lazy, low)
                        continue
                    new_w, new_s = self.lazy_rule(w.index_select(0, rows), values.to(w.dtype),
                                                  _sparse.gather(s, rows), lr=lr, wd=wd, t=t, index=i)
                    _sparse.write_rows_(w, low, s, new_w, new_s, rows)
                    continue
                if mode == "standard":  # MXNet's storage fallback: the dense rule on the densified gradient
                    g = torch.sparse_coo_tensor(rows[None], values, g.shape, is_coalesced=True,
                                                check_invariants=False).to_dense()
                self._apply(self.standard_rule if mode == "standard" else self.rule, i, w, g, s, (lr, wd, t))
                if low is not None:
                    low.copy_(w)

    def _compiles_lazy(self):
        """Whether a lazy update may run compiled (:func:`engine.execute_rows`): the class's lazy update is
        its ``lazy_prepare`` + ``lazy_kernel`` split (not an overridden ``lazy_rule``), the fast path is on
        for these settings, and ``fused=False`` (the reference path) was not asked for."""
        cls = type(self)
        return (self._fused is not False and cls.lazy_rule is Optimizer.lazy_rule and cls.has_kernel()
                and self._has_fast_path())

    def _apply(self, rule, index, weight, grad, state, read):
        """One index by ``rule`` (the reference path): the new state assigned into ``state``, the new weight
        copied into ``weight``, in place."""
        lr, wd, t = read
        new_w, new_s = rule(weight, grad.to(weight.dtype), state, lr=lr, wd=wd, t=t, index=index)
        _tree.assign(state, new_s)
        if new_w is not None and new_w is not weight:
            weight.copy_(new_w)

    def _check_reads(self, indices, reads):
        """Refuse an index's ``(lr, wd, t)`` (``reads``, in list order) before any tensor changes: a ValueError
        naming the index and the value (SGLD: a negative effective lr). Counting and reading are undone."""

    def _reads_for(self, indices, chunks):
        """The per-update checks (GroupAdaGrad's effective wd), then every index counted and read, MXNet call by
        call (``chunks``; None: one call), then the checks of what was read (SGLD's effective lr). The caller
        restores the bookkeeping if this raises."""
        check = getattr(self, "_check_indices", None)
        if check is not None:
            check(indices)
        if chunks is not None and len(chunks) > 1 and not self._reads_per_index and \
                type(self)._get_lrs is Optimizer._get_lrs and len(set(indices)) == len(indices) and \
                self._counted_alike(indices):
            # an aggregating optimizer's calls (lists of up to aggregate_num) over indices counted alike read
            # what one call reads (each call counts to the same t, num_update moves at the first only, and
            # the default read is a function of num_update; LARS's reads keep per-call state): one read
            # instead of one per call (500 for 2,000 parameters)
            chunks = None
        if chunks is None:  # one call (the torch face, the Trainer's step): no loop body per index
            reads = self._read_list(list(indices))
            self._check_reads(indices, reads)
            return reads
        reads = [None] * len(indices)
        for chunk in chunks:
            for k, read in zip(chunk, self._read_list([indices[k] for k in chunk])):
                reads[k] = read
        self._check_reads(indices, reads)
        return reads

    def _prepare_all(self, indices, weights, reads):
        """``prepare`` for every index, in index order; computed once per distinct ``(lr, wd, t, dtype)``
        unless ``prepare`` advances per-index state (``_prepare_advances``)."""
        if self._prepare_advances:
            return [self.prepare(lr=lr, wd=wd, t=t, index=i, dtype=w.dtype)
                    for i, w, (lr, wd, t) in zip(indices, weights, reads)]
        dtype = weights[0].dtype if weights else None
        if reads and reads.count(reads[0]) == len(reads) and list(map(_DTYPE, weights)).count(dtype) == len(weights):
            lr, wd, t = reads[0]  # one (lr, wd, t, dtype) for every index (the common case): one tuple, shared
            return [self.prepare(lr=lr, wd=wd, t=t, index=indices[0], dtype=dtype)] * len(indices)
        seen, out = {}, []
        for i, w, read in zip(indices, weights, reads):
            key = read + (w.dtype,)
            s = seen.get(key)
            if s is None:
                lr, wd, t = read
                s = seen[key] = self.prepare(lr=lr, wd=wd, t=t, index=i, dtype=w.dtype)
            out.append(s)
        return out

    def _read_list(self, indices):
        """One MXNet call's reads: the whole list counted, then read once, where MXNet's ``_update_impl`` does
        (``_counts_call_at_once``: SGD, LARS), or where the counts agree (the same values as index by
        index); otherwise index by index."""
        together = not self._reads_per_index and len(set(indices)) == len(indices) and (
            self._counts_call_at_once or self._counted_alike(indices))
        return self._count_and_read(indices, together=together)

    def _counted_alike(self, indices):
        """Whether every index has the same update count (never counted ones alike), compared in C."""
        counts = list(map(self._index_update_count.get, indices))
        return counts.count(counts[0]) == len(counts) if counts else True

    def _bookkeeping(self):
        """A copy of the Python state that counting, reading and ``prepare`` advance (for :meth:`_restore`)."""
        saved = {k: (dict(v) if isinstance(v, dict) and k not in _CACHES else v) for k, v in self.__dict__.items()}
        saved["_all_index_update_counts"] = {c: dict(v) for c, v in self._all_index_update_counts.items()}
        # schedulers keep state that reading the lr advances (FactorScheduler's count and base_lr), reassigned
        # on each change (never mutated in place): a shallow copy restores it
        sched = self.lr_scheduler
        saved[_SCHEDULER_VARS] = dict(vars(sched)) if hasattr(sched, "__dict__") else None
        return saved

    def _restore(self, saved):
        saved = dict(saved)
        sched_vars = saved.pop(_SCHEDULER_VARS)
        self.__dict__.clear()
        self.__dict__.update(saved)
        if sched_vars is not None:
            vars(self.lr_scheduler).clear()
            vars(self.lr_scheduler).update(sched_vars)
        self._index_update_count = self._all_index_update_counts.setdefault(self._current_context, {})

    def _count_and_read(self, indices, together=False):
        """Count each index and read its ``(lr, wd, t)``, in MXNet's order (the count comes first, except
        for LBSGD, which reads its learning rate before counting).

        Index by index, as one-by-one calls do; ``together`` counts the whole list, then reads once: the
        same values when the indices' counts are equal, with one scheduler call instead of one per index.
        """
        counts, before = self._counts_updates, self._lr_before_count
        groups = [list(indices)] if together else [[i] for i in indices]
        out = []
        for group in groups:
            if counts and not before:
                self._update_count(group)
            lrs, wds = self._get_lrs(group), self._get_wds(group)
            if counts and before:
                self._update_count(group)
            ts = map(self._index_update_count.__getitem__, group) if counts else _repeat(None)
            out += zip(lrs, wds, ts)
        return out

    @pausing
    def update_multi_precision(self, index, weight, grad, state):
        """``update`` on the fp32 master copy of fp16/bf16 weights, then cast back into the weight."""
        indices, weights, grads, states = _as_lists(index, weight, grad, state)
        if not any(self._mp(w) for w in weights if isinstance(w, torch.Tensor)):
            return self._dispatch(indices, weights, grads, states)
        if type(self).update is Optimizer.update:  # one MXNet call, checked, on the master copies
            return self._update_calls(None, indices, weights, grads, states)
        targets = []  # a custom scalar update: called on each master copy, then cast back
        for i, w, g, s in zip(indices, weights, grads, states):
            check_tensor_pair(i, w, g)
            if self._mp(w):
                self._check_master(i, w, s)
                w32, inner = self._split_mp(s)
                targets.append((i, w32, g.to(torch.float32), inner, w))
            else:
                targets.append((i, w, g, s, None))
        check_distinct_weights(indices, weights)
        self._dispatch([t[0] for t in targets], [t[1] for t in targets], [t[2] for t in targets],
                       [t[3] for t in targets])
        low = [(t[4], t[1]) for t in targets if t[4] is not None]
        with torch.no_grad():
            torch._foreach_copy_([w for w, _ in low], [w32 for _, w32 in low])

    def _run_checked(self, indices, weights, grads, states, chunks=None):
        """``update_multi_precision`` on checked inputs, as the MXNet calls ``chunks`` (see ``_step_lists``)."""
        if type(self).update is not Optimizer.update:  # a custom update: MXNet's path, checks included
            for chunk in (chunks if chunks is not None else [range(len(indices))]):
                self.update_multi_precision(*([x[k] for k in chunk] for x in (indices, weights, grads, states)))
            return
        if not self.multi_precision or not any(self._mp(w) for w in weights):
            return self._step_lists(indices, weights, grads, states, chunks=chunks)
        masters, inners, lows = [], [], []
        for w, s in zip(weights, states):
            if self._mp(w):  # the rule runs on the fp32 master copy; the weight gets its rounding
                w32, inner = self._split_mp(s)
                masters.append(w32)
                inners.append(inner)
                lows.append(w)
            else:
                masters.append(w)
                inners.append(s)
                lows.append(None)
        self._step_lists(indices, masters, grads, inners, chunks=chunks, lows=lows)

    def _update_calls(self, chunks, indices, weights, grads, states):
        """The Updater's MXNet calls (lists of positions ``chunks``; None: one call), checked, then run as one
        step."""
        held = self._checks_hold("calls", indices, weights, grads, states)
        if not held:
            ours = type(self).update is Optimizer.update
            for i, w, g, s in zip(indices, weights, grads, states):
                check_tensor_pair(i, w, g)
                if self._mp(w):  # the master copy, then the state of the rule that runs on it
                    self._check_master(i, w, s)
                    w, s = self._split_mp(s)
                if ours:
                    self._check_state(i, w, s)
            self._checks_passed("calls", indices, weights, grads, states)
        self._check_distinct(held, indices, weights)
        self._run_checked(indices, weights, grads, states, chunks)

    def _check_master(self, i, w, s):
        if not (isinstance(s, (tuple, list)) and len(s) == 2):
            raise TypeError(f"state for index {i!r} is {_tree.describe(s)}: expected a multi-precision "
                            "state from create_state_multi_precision")
        w32, _ = self._split_mp(s)
        if not (isinstance(w32, torch.Tensor) and w32.dtype == torch.float32 and w32.shape == w.shape
                and w32.device == w.device):
            raise TypeError(f"state for index {i!r} is {_tree.describe(s)}: expected an fp32 master "
                            f"copy of shape {tuple(w.shape)} on {w.device}")

    def _dispatch(self, indices, weights, grads, states):
        """Call ``update`` with lists when it is ours; one by one for a custom scalar ``update``."""
        if type(self).update is Optimizer.update:
            self.update(indices, weights, grads, states)
        else:
            for args in zip(indices, weights, grads, states):
                self.update(*args)

    def _mark_state(self, state):
        """Mark a state (read back from a file) as this optimizer's, as ``create_state`` marks new ones."""
        return _tree.tag(state, self._state_owner) if self._state_owner else state

    def _adopt_state(self, index, param, state, what):
        """A state read back for ``param``: moved to its device, checked against this optimizer's layout
        (a ValueError starting with ``what`` otherwise) and marked as this optimizer's."""
        state = _tree.to_device(state, param.device)
        meta = torch.empty(param.shape, dtype=param.dtype, device="meta")
        expected = self.create_state_multi_precision(index, meta)
        if not _tree.same_structure(expected, state, param.device):
            raise ValueError(f"{what} is {_tree.describe(state)}: expected {_tree.describe(expected)} for a "
                             f"parameter of shape {tuple(param.shape)}")
        return self._mark_state(state)

    def _checks_hold(self, how, indices, weights, grads, states):
        """Whether the per-index checks of the last call (``how``: ``"update"`` or the Updater's ``"calls"``)
        passed on these inputs and would pass again, found in C-level maps: the same indices, the same state
        objects (trees of tuples, whose leaves are then the same tensors), each leaf and each weight of the same
        dtype, shape and device as then, plain gradients of their weights' (:func:`plain_pairs`), and
        the same settings that shape a state. ResNet-50's 161 tensors (Adam): ~0.2 ms instead of ~1 ms a call."""
        got = self.__dict__.get("_checked")
        if got is None or got[0] != self._checks_key(how) or got[1] != indices or len(got[2]) != len(states) \
                or not all(map(operator.is_, got[2], states)):
            return False
        leaves = got[4]
        return plain_pairs(weights, grads) == got[3] and list(map(_DTYPE, leaves)) == got[5][0] and \
            list(map(_SHAPE, leaves)) == got[5][1] and list(map(_DEVICE, leaves)) == got[5][2]

    def _checks_passed(self, how, indices, weights, grads, states):
        """Remember a call whose per-index checks all passed, for :meth:`_checks_hold` (where every state is a
        tree of tuples and every gradient plain; else nothing is remembered)."""
        self.__dict__.pop("_checked", None)
        keys = plain_pairs(weights, grads)
        if keys is None or not all(map(_frozen, states)):
            return
        leaves = list(itertools.chain.from_iterable(map(_tree.leaves, states)))
        self._checked = (self._checks_key(how), list(indices), list(states), keys, leaves,
                         (list(map(_DTYPE, leaves)), list(map(_SHAPE, leaves)), list(map(_DEVICE, leaves))))

    def _check_distinct(self, held, indices, weights):
        """:func:`check_distinct_weights`, unless it passed on weights at these same addresses under the current
        :meth:`_checks_hold` record (``held``: this call matches it, so the indices, shapes and dtypes are the
        same, hence the spans of memory, where every weight is contiguous and strided): ~1.2 ms a call on 2,000
        weights, ~0.1 ms for the addresses."""
        rec, got = self.__dict__.get("_checked"), self.__dict__.get("_distinct")
        plain = all(map(operator.is_, map(_LAYOUT, weights), _repeat(torch.strided))) and \
            all(map(torch.Tensor.is_contiguous, weights))
        ptrs = list(map(torch.Tensor.data_ptr, weights)) if plain else None
        if held and plain and got is not None and got[0] is rec and got[1] == ptrs:
            return
        check_distinct_weights(indices, weights)
        if rec is not None and plain:
            self._distinct = (rec, ptrs)

    def _checks_key(self, how):
        # what else the checks read: the settings that shape a state (as _check_state's spec cache) and the mark
        return (how, self.multi_precision, getattr(self, "momentum", None), getattr(self, "centered", None),
                self._state_owner)

    def _check_state(self, index, weight, state):
        """Reject a state of another layout, shape, dtype, device or optimizer before any update."""
        if type(self).create_state is Optimizer.create_state and state is None:
            return
        try:
            owner = _tree.owner_of(state)
        except TypeError as exc:  # not a tree of tensors at all: say which index
            raise TypeError(f"state for index {index!r} is invalid: {exc}") from None
        expected_owner = self._state_owner
        if owner is not None and expected_owner is not None and owner != expected_owner:
            raise TypeError(f"state for index {index!r} was created by {owner}: expected a state created by "
                            f"{expected_owner} (this {type(self).__name__})")
        # what create_state makes for this weight (on the meta device: no memory), remembered per index, shape,
        # dtype and the settings that change a state's layout (a meta tensor op costs ~60 us)
        specs = self.__dict__.setdefault("_state_specs", {})
        key = (index, tuple(weight.shape), weight.dtype, getattr(self, "momentum", None),
               getattr(self, "centered", None))
        try:
            expected = specs.get(key)
        except TypeError:  # an unhashable index: not remembered
            key, expected = None, None
        if expected is None:
            expected = self.create_state(index, torch.empty(weight.shape, dtype=weight.dtype, device="meta"))
            if key is not None and expected is not None:
                specs[key] = expected
        if not _tree.same_structure(expected, state, weight.device):
            raise TypeError(f"state for index {index!r} is {_tree.describe(state)}: expected "
                            f"{_tree.describe(expected)} on {weight.device}, as {type(self).__name__}"
                            ".create_state makes it")

    # ------------------------------------------------------------------ pickling and safe dumps
    def __getstate__(self):
        state = {k: v for k, v in self.__dict__.items() if k not in _CACHES}  # caches (scratch buffers) stay
        state["param_dict"] = {}  # as MXNet: Gluon parameters are not saved with the optimizer
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.param_dict = {}

    def __repr__(self):
        args, kwargs = self._init_args
        shown = [repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()]
        return f"{type(self).__name__}({', '.join(shown)})"


#: The key of the scheduler's attributes in :meth:`Optimizer._bookkeeping` (not an attribute name).
_SCHEDULER_VARS = object()

#: Attributes that only cache derived values: not part of the bookkeeping a failed update restores.
_CACHES = frozenset({"_prepared", "_face_layouts", "_layouts", "_shards", "_counter_offsets", "_scratch",
                     "_state_specs", "_scalar_tensors", "_clip_memo", "_joined_states", "_lineage",
                     "_structure", "_phases", "_large_plans", "_direct", "_packs", "_checked", "_distinct"})

#: What a state tensor's check reads of it (its layout stays: ``.data =`` and ``set_`` keep a tensor strided).
_SHAPE, _DEVICE = operator.attrgetter("shape"), operator.attrgetter("device")


def _frozen(tree):
    """Whether ``tree`` is None, a tensor, or tuples of those (its leaves are then fixed by its identity)."""
    if tree is None or isinstance(tree, torch.Tensor):
        return True
    return type(tree) is tuple and all(map(_frozen, tree))


def _plain_arg(value):
    """A constructor argument as a plain Python value where it is a numpy scalar, a 0-d array or a 0-d tensor
    (an array with dimensions is left for the constructor's check to refuse by name), also inside plain dicts,
    lists and tuples (``param_idx2name``'s keys)."""
    if type(value) is dict:
        return {_plain_arg(k): _plain_arg(v) for k, v in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_plain_arg(v) for v in value)
    try:
        return plain("", value, "")
    except ValueError:
        return value


def _checked_mults(what, mults):
    """``set_lr_mult`` / ``set_wd_mult``'s dict, every value checked (a plain number) before any is stored."""
    if not isinstance(mults, dict):
        raise TypeError(f"args_{what}={mults!r} is invalid: expected a dict of index or name -> float")
    return {_plain_arg(k): check_number(f"{what}[{k!r}]", v) for k, v in mults.items()}


def _check_dense(indices, weights, lows):
    """Dense weights only (a sparse weight would fail inside the kernels, after the counts moved); checked in
    C-level maps (no Python loop body per weight), the loop only names the culprit."""
    checked = [weights] if not lows else [weights, [lo if lo is not None else w for lo, w in zip(lows, weights)]]
    for ws in checked:
        if all(map(_is, map(_LAYOUT, ws), _repeat(torch.strided))):
            continue
        for i, w in zip(indices, ws):
            if w.layout is not torch.strided:
                raise TypeError(f"weight for index {i!r} has layout {w.layout}: expected a dense (strided) tensor")


_LAYOUT, _DTYPE, _is, _repeat = operator.attrgetter("layout"), operator.attrgetter("dtype"), operator.is_, itertools.repeat


def _as_lists(index, weight, grad, state):
    """Scalar calls become one-element lists; lists must agree in length."""
    if isinstance(index, (list, tuple)):
        parts = {"weight": weight, "grad": grad, "state": state}
        for name, value in parts.items():
            if not isinstance(value, (list, tuple)) or len(value) != len(index):
                got = f"a {type(value).__name__}" + (f" of length {len(value)}" if isinstance(value, (list, tuple)) else "")
                raise ValueError(f"{name} is {got}: with a list of {len(index)} indices, expected a list of "
                                 f"{len(index)} {name}s")
        return list(index), list(weight), list(grad), list(state)
    return [index], [weight], [grad], [state]
