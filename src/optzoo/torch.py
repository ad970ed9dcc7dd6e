"""The ``torch.optim.Optimizer`` face of every registered optimizer.

``optzoo.torch.<Name>`` exists for every registered optimizer (custom ones too, with no extra code),
under its MXNet class name, and ``optzoo.torch.create(name, params, **kwargs)`` builds one by name::

    opt = optzoo.torch.FTML(model.parameters(), lr=1e-3, beta1=0.6)
    opt = optzoo.torch.create('lamb', model.parameters(), learning_rate=1e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.01, total_steps=1000)

Hyperparameters use MXNet's names, with torch's accepted as aliases: ``lr`` (``learning_rate``),
``weight_decay`` (``wd``), ``betas`` (``beta1``, ``beta2``). Param groups store the torch names, so
torch's schedulers (which write ``group['lr']``, and ``group['betas']`` or ``group['momentum']``) take
effect at the next step. ``rescale_grad`` defaults to 1. The math is the MXNet-style optimizer's own:
each param group drives one instance of it, so both faces give the same numbers.

Row-sparse gradients (``nn.Embedding(sparse=True)``) are taken where the MXNet-style optimizer takes them;
``lazy`` (alias of the group key ``lazy_update``, default MXNet's choice) picks a lazy update (only the rows the
gradient touches change) or the standard one, for SGD, Adam, LARS and FTRL (opt-in there).

Not accepted here: ``lr_scheduler`` (use torch's schedulers), ``param_idx2name``, ``param_dict`` and
``sym`` (use param groups for per-parameter hyperparameters).
"""
from __future__ import annotations

import operator as _operator
from itertools import compress as _compress, repeat as _repeat

import torch as _torch

from ._gc import paused as _gc_paused
from ._checks import check_tensor_pair, plain_pairs as _plain_pairs
from ._flat import flatten_parameters
from .optimizer import registry as _registry
from .optimizer._numerics import Shards
from .optimizer import engine as _engine
from .optimizer.base import Optimizer as _Optimizer
from .optimizer.engine import adjacent, run_keys
from ._torch_state import check_state_dict as _check_state_dict
from ._torch_state import layout as _layout, named as _named, restore_wide_states, tree_of as _tree_of
from ._torch_state import trees_of as _trees_of
from .optimizer.updater import calls as _calls

__all__ = ["OptzooOptimizer", "create", "flatten_parameters"]

_TORCH_NAMES = {"learning_rate": "lr", "wd": "weight_decay"}
#: Short names accepted for group keys that keep their MXNet name: ``lazy`` (row-sparse gradients, lazy or standard).
_SHORT_NAMES = {"lazy": "lazy_update"}
_REJECTED = ("lr_scheduler", "param_idx2name", "param_dict", "sym")


class OptzooOptimizer(_torch.optim.Optimizer):
    """Base of the generated ``optzoo.torch.<Name>`` classes; ``optimizer_class`` is the MXNet-style class.

    A torch.optim citizen: hyperparameters live in ``param_groups`` and are read (and validated) at every
    step; each parameter's state lives in ``self.state[p]`` as named tensors plus ``step`` (its update
    count); the optimizer's own bookkeeping (``num_update``; Nadam's shared schedule, LARS's last
    learning rate, LBSGD's accumulators) lives in each group under ``"optzoo"``. So torch's
    ``state_dict`` / ``load_state_dict`` (with their hooks and dtype/device casting), deepcopy, pickle and
    ``torch.distributed.checkpoint`` work as for torch's own optimizers. Parameters and their ``.grad``
    are never re-bound: weights are updated in place, gradients only read. Parameters without a gradient
    get no state.
    """

    optimizer_class = None

    def __init__(self, params, fused=None, **kwargs):
        if self.optimizer_class is None:
            raise TypeError("use optzoo.torch.<Name> or optzoo.torch.create(name, params, ...)")
        if fused not in (None, False, True):
            raise ValueError(f"fused={fused!r} is invalid: expected None (the fast path, compiled where it pays), "
                             "True (every update compiled) or False (the reference path)")
        self.fused = fused
        defaults = self._defaults()
        for key, value in _to_group_keys(type(self).__name__, kwargs, defaults).items():
            if key not in defaults:
                raise TypeError(f"{type(self).__name__}() got an unexpected keyword argument {key!r}")
            defaults[key] = value
        super().__init__(params, defaults)
        self.register_load_state_dict_post_hook(_OptzooOptimizer_restore_wide_states, prepend=True)

    @classmethod
    def _defaults(cls) -> dict:
        record = next(r for r in _registry.records() if r.cls is cls.optimizer_class)
        mx = {"learning_rate": None, "wd": 0.0, "rescale_grad": 1.0, "clip_gradient": None,
              "multi_precision": False, "begin_num_update": 0}
        mx.update(record.defaults())
        for key in _REJECTED:
            mx.pop(key, None)
        if mx["learning_rate"] is None:
            mx["learning_rate"] = 0.01  # MXNet's default when no scheduler is given
        return _to_group_keys(cls.__name__, mx)

    def __getstate__(self):
        state = super().__getstate__()
        state["fused"] = self.fused
        return state

    def __setstate__(self, state):
        state.setdefault("fused", None)
        super().__setstate__(state)

    # ------------------------------------------------------------------ groups
    def add_param_group(self, param_group):
        """torch's ``add_param_group``; a parameter listed twice in one group is an error (torch only warns,
        and a repeated parameter would be updated twice by some paths and once by others)."""
        if isinstance(param_group, dict) and not isinstance(param_group.get("params"), (_torch.Tensor, set)):
            param_group = dict(param_group, params=list(param_group.get("params", ())))
            for short, key in _SHORT_NAMES.items():
                if short in param_group:
                    if key in param_group:
                        raise TypeError(f"param group: got both {short!r} and its alias {key!r}")
                    param_group[key] = param_group.pop(short)
            first = {}
            for k, p in enumerate(param_group["params"]):
                k0 = first.setdefault(id(p), k)
                if k0 != k:
                    raise ValueError(f"params: the parameter at position {k} of the group is the one at position "
                                     f"{k0}: expected each parameter once (list tied parameters once)")
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._inner_for(group, len(self.param_groups) - 1)
        except Exception:
            self.param_groups.pop()
            raise
        group.setdefault("optzoo", {})

    def _mx_kwargs(self, group) -> dict:
        kwargs = {}
        keys = type(self).__dict__.get("_keys")
        if keys is None:
            keys = type(self)._keys = tuple(self._defaults())
        for key in keys:
            value = group[key]
            if isinstance(value, _torch.Tensor) and value.numel() == 1:  # a tensor lr (compiled-step recipe)
                value = value.item()
            if key == "betas":
                kwargs["beta1"], kwargs["beta2"] = (v.item() if isinstance(v, _torch.Tensor) else v for v in value)
            else:
                kwargs[{"lr": "learning_rate", "weight_decay": "wd"}.get(key, key)] = value
        return kwargs

    def _inner_for(self, group, g):
        """The MXNet-style optimizer for a group's current hyperparameters (validated as constructor
        arguments; a ValueError/TypeError names the group), cached while they do not change."""
        kwargs = self._mx_kwargs(group)
        cache = self.__dict__.setdefault("_inner_cache", {})
        hit = cache.get(id(group))
        if hit is not None and hit[0] is group and hit[1] == kwargs:
            return hit[2]
        try:
            inner = self.optimizer_class(**kwargs)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"param group {g}: {exc}") from None
        inner._fused = self.fused
        inner._lineage = object()
        if hit is not None and hit[0] is group:  # new values (a scheduler's lr): what the old one built stays
            _carry_caches(hit[2], inner)
        cache[id(group)] = (group, kwargs, inner)
        return inner

    def mxnet_optimizer(self, group=0):
        """The MXNet-style optimizer that runs param group ``group`` (rebuilt when its hyperparameters change)."""
        return self._inner_for(self.param_groups[group], group)

    def mx_state(self, param):
        """``param``'s state in MXNet's layout (``create_state_multi_precision``'s tree of tensors), or None
        before its first update. The tensors are those of ``self.state[param]``."""
        st = self.state.get(param)
        if not st or "step" not in st:
            return None
        g = next(k for k, group in enumerate(self.param_groups) if any(p is param for p in group["params"]))
        return _tree_of(_layout(self.mxnet_optimizer(g), _detach(param)), st)

    # ------------------------------------------------------------------ stepping
    @_torch._dynamo.disable  # Python bookkeeping: a compiled step calls it as it is (no recompiles)
    @_torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter that has a gradient; returns ``closure()``'s loss if given.

        Everything is checked first (every group's hyperparameters, every gradient): on an error nothing
        has changed."""
        loss = None
        if closure is not None:
            with _torch.enable_grad():
                loss = closure()
        with _gc_paused():  # the step's thousands of small containers never trigger a collection
            self._step_all()
        return loss

    def _step_all(self):
        plans, base = [], 0
        for g, group in enumerate(self.param_groups):
            inner = self._inner_for(group, g)
            params = group["params"]
            grads = list(map(_GRAD, params))
            indices = list(range(base, base + len(params)))
            base += len(params)
            if not all(map(_is_not, grads, _repeat(None))):  # parameters without a gradient are skipped
                keep = list(map(_is_not, grads, _repeat(None)))
                indices, params, grads = (list(_compress(x, keep)) for x in (indices, params, grads))
            lane = self._lane(group, inner, indices, params, grads)
            if lane is not None:  # the steady state of a pack: its facts kept from the last step
                plans.append((group, inner, indices, params, grads, None, lane))
                continue
            keys = _plain_pairs(params, grads)  # the weights' (dtype, shape, device)s where every pair is plain
            if keys is None:  # the full check, for its message
                for k, p, grad in zip(indices, params, grads):
                    check_tensor_pair(k, p, grad)
            plans.append((group, inner, indices, params, grads, keys))
        for plan in plans:
            if plan[2]:
                self._step_group(*plan)

    def _lane(self, group, inner, indices, params, grads):
        """The steady state of a param group whose graded parameters (``indices``, ``params``, ``grads``) the
        executor runs as one :class:`~optzoo.optimizer.engine.Plan` (plain tensors of one dtype, device and state
        layout, dense gradients of their shapes, every state made): ``(lane, states, steps)``, else None (the
        general path, which checks and names what is wrong). The :class:`_Lane` (what the plan needs beyond the
        tensors) is kept while the parameters are the same objects with the same dtypes, shapes and devices,
        under the same hyperparameters; the gradients, states and step counts are read at every step."""
        if not params:
            return None
        lanes = self.__dict__.setdefault("_lanes", {})
        lane = lanes.get(id(group))
        ids = list(map(id, params))
        known = lane is not None and lane.group is group and lane.lineage is inner._lineage and lane.ids == ids \
            and lane.indices == indices
        if known and lane.plan is None:  # not one plan (several dtypes, ...): decided once for these
            return None                  # parameters under these hyperparameters, at no cost per step
        sig = list(map(_SIG, params))
        if list(map(_SIG, grads)) != sig:
            return None
        if not known or lane.sig != sig:
            lane = lanes[id(group)] = _Lane(group, inner, params, sig, ids, indices)
        if lane.plan is None or not inner._has_fast_path():  # (LBSGD's depends on settings one may edit)
            return None
        sts = list(map(self.state.get, params))  # (not ``[]``: the defaultdict would add empty states before
        if not all(sts):                          # the later groups' checks ran)
            return None
        steps = list(map(dict.get, sts, _repeat("step")))
        if not all(map(_is_not, steps, _repeat(None))):
            return None
        return lane, sts, steps

    def _step_group(self, group, inner, indices, params, grads, keys=None, lane=None):
        book = group.setdefault("optzoo", {})
        for attr in inner._step_vars:
            if attr in book:
                setattr(inner, attr, book[attr])
        counts = inner._index_update_count
        counts.clear()
        if lane is not None:  # the parameters themselves (the plan updates them in place, copies them, or views
            # their buffer)
            lane, sts, steps = lane
            trees = _trees_of(lane.layouts, lane.keys, sts)
            counts.update(zip(indices, map(int, steps)))
            inner._shards = inner._counter_offsets = None
            scalars = inner._fast_scalars(indices, params, lane.chunks)
            _engine.run_plan(inner, inner._fused, lane.plan, params, grads, trees, scalars)
        else:
            sts = list(map(self.state.__getitem__, params))
            weights = list(map(_detach, params))
            steps = list(map(dict.get, sts, _repeat("step")))
            shards, offsets = {}, {}
            if all(map(_is, map(type, weights), _repeat(_Tensor))) and all(map(_is_not, steps, _repeat(None))):
                # the steady state (every state made, plain tensors), without a Python loop body per parameter
                if keys is None:
                    keys = list(zip(map(_DTYPE, weights), map(_SHAPE, weights)))
                layouts = {key: _layout(inner, w) for key, w in dict(zip(keys, weights)).items()}
                trees = _trees_of(layouts, keys, sts)
                counts.update(zip(indices, map(int, steps)))
            else:
                weights, grads, trees = self._gather(inner, indices, params, grads, sts, counts, shards, offsets)
            inner._shards, inner._counter_offsets = shards, offsets
            inner._run_checked(indices, weights, grads, trees, _calls(inner, list(range(len(indices))), weights))
            inner._shards = inner._counter_offsets = None
        list(map(dict.__setitem__, sts, _repeat("step"), map(counts.__getitem__, indices)))
        book.update({attr: getattr(inner, attr) for attr in inner._step_vars})

    def _gather(self, inner, indices, params, grads, sts, counts, shards, offsets):
        """Weights, gradients and state trees parameter by parameter: new states made (small ones end to end
        in one buffer), DTensor parameters as their local shards."""
        weights, local_grads, trees, created, layouts = [], [], [], [], {}
        for i, p, g, st in zip(indices, params, grads, sts):
            w = _detach(p)
            sharded = type(w) is not _Tensor and _is_dtensor(w)
            if sharded:  # FSDP2: the math runs on the local shards; norms are summed over the shards
                w, g = w.to_local(), g.to_local()
                groups = _shard_groups(p)
                if groups:
                    shards[i] = Shards(groups)
                    offsets[i] = _global_offset(p)
            key = (w.dtype, w.shape)
            layout = layouts.get(key)
            if layout is None:
                layout = layouts[key] = _layout(inner, w)
            step = st.get("step")
            fresh = step is None
            if fresh:  # a new state (an unsharded parameter's is made below, with the others)
                if sharded:
                    new = _named(layout, inner.create_state_multi_precision(i, w))
                    st.update({k: _like(v, p) for k, v in new.items()})
                else:
                    created.append((len(trees), layout, st, inner.create_state_multi_precision(i, w)))
                step = st["step"] = inner.begin_num_update
            if sharded:
                tree = _tree_of(layout, {n: st[n].to_local() for n in layout.names})
            else:
                tree = None if fresh else _tree_of(layout, st)
            counts[i] = step if type(step) is int else int(step)
            weights.append(w)
            local_grads.append(g)
            trees.append(tree)
        if created:  # new states of small parameters end to end in one buffer: packed steps use them in place
            made = adjacent([c[3] for c in created], run_keys(inner, [weights[c[0]] for c in created]))
            for (k, layout, st, _), tree in zip(created, made):
                st.update(_named(layout, tree))
                trees[k] = tree
        return weights, local_grads, trees

    # ------------------------------------------------------------------ state dicts
    def load_state_dict(self, state_dict):
        """torch's ``load_state_dict`` (hooks, casting to each parameter's device and dtype), after checking
        everything first: the groups' hyperparameters as constructor arguments, and every parameter's
        state against this optimizer's layout. On an error nothing changes."""
        _check_state_dict(self, state_dict)
        self._loading = state_dict
        try:
            super().load_state_dict(state_dict)
        finally:
            self.__dict__.pop("_loading", None)
            self.__dict__.pop("_inner_cache", None)
            self.__dict__.pop("_lanes", None)


#: ``Tensor.detach`` itself: ``Parameter.detach()`` goes through ``__torch_function__`` (12 us against 1 us a call,
#: measured: 25 ms a step over 2,000 parameters)
_detach = _torch.Tensor.detach


_Tensor = _torch.Tensor
_STRIDED = _torch.strided


_GRAD, _DTYPE, _SHAPE = _operator.attrgetter("grad"), _operator.attrgetter("dtype"), _operator.attrgetter("shape")
_SIG = _operator.attrgetter("dtype", "shape", "device", "layout")
_PLAIN = {_torch.Tensor, _torch.nn.Parameter}  # parameters whose ops are torch's own (no __torch_function__)
_is, _is_not = _operator.is_, _operator.is_not


#: An optimizer's caches keyed by values or by checked identities (scratch buffers, joined states, scalar
#: tensors), and those that follow its state's structure (layouts, expected state specs).
_VALUE_CACHES = ("_scratch", "_joined_states", "_scalar_tensors", "_phases", "_large_plans", "_direct", "_packs")
_STRUCTURE_CACHES = ("_layouts", "_face_layouts", "_state_specs")


def _carry_caches(old, new):
    """``new`` (the group's MXNet-style optimizer rebuilt for new hyperparameter values, at every step under a
    scheduler) takes ``old``'s caches: the value-keyed ones always, the structural ones (and ``old``'s
    lineage, which keeps the group's lane) where both make states of the same structure, take the fast path
    alike and agree on multi-precision. Without them a scheduled step re-made its scratch buffers (their page
    faults), joins and pack: 2,000 parameters of 1K, Adam 18 -> 37 ms a step."""
    for name in _VALUE_CACHES:
        if name in old.__dict__:
            new.__dict__[name] = old.__dict__[name]
    if _structure(old) == _structure(new):
        for name in _STRUCTURE_CACHES:
            if name in old.__dict__:
                new.__dict__[name] = old.__dict__[name]
        new._lineage = old._lineage


def _structure(opt):
    """What an optimizer's state layouts depend on besides the weight: its class, multi-precision and fast-path
    settings, and the structure (shapes, dtypes) of the state it makes for a 2-D fp32 weight."""
    def shape(tree):
        if tree is None or isinstance(tree, _torch.Tensor):
            return None if tree is None else (tuple(tree.shape), tree.dtype)
        return tuple(shape(t) for t in tree)
    got = opt.__dict__.get("_structure")
    if got is None:  # once per optimizer: the next rebuild compares with it
        probe = _torch.empty((2, 4), dtype=_torch.float32, device="meta")
        got = opt._structure = (type(opt), opt.multi_precision, opt._has_fast_path(),
                                shape(opt.create_state_multi_precision(0, probe)))
    return got


class _Lane:
    """A param group's step as :meth:`OptzooOptimizer._lane` keeps it: the graded parameters (their ids, indices
    and ``(dtype, shape, device, layout)``s), the state layouts, the MXNet calls, and the engine's
    :class:`~optzoo.optimizer.engine.Plan`; ``plan`` is None where the fast path does not run the group as one
    plan (then the general path runs, and this says so until the parameters or hyperparameters change)."""

    __slots__ = ("group", "lineage", "ids", "indices", "sig", "keys", "layouts", "chunks", "plan")

    def __init__(self, group, inner, params, sig, ids, indices):
        self.group, self.lineage, self.ids, self.indices, self.sig = group, inner._lineage, ids, indices, sig
        self.plan = None
        dtype = sig[0][0]
        if (type(inner).update is not _Optimizer.update or inner._fused is False or not inner._has_fast_path()
                or not set(map(type, params)) <= _PLAIN or not dtype.is_floating_point
                or any(len(set(map(_operator.itemgetter(k), sig))) != 1 for k in (0, 2, 3))
                or sig[0][3] is not _STRIDED or (inner.multi_precision and inner._mp(params[0]))):
            return
        kinds = {p.dim() == 2: p for p in params}.values()  # the engine's layout depends on 2-D or not
        layouts = {_engine.layout_of(inner, p) for p in kinds}
        if len(layouts) != 1 or None in layouts:
            return
        self.keys = [(d, shape) for d, shape, _, _ in sig]
        self.layouts = {key: _layout(inner, w) for key, w in dict(zip(self.keys, params)).items()}
        self.chunks = _calls(inner, list(range(len(params))), params)
        self.plan = _engine.Plan(inner, layouts.pop(), params)


def _is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor" and hasattr(t, "to_local")


def _shard_groups(p):
    """The process groups of the mesh dimensions a DTensor parameter is sharded over."""
    mesh = p.device_mesh
    return [mesh.get_group(d) for d, placement in enumerate(p.placements) if placement.is_shard()]


def _global_offset(p):
    """Where a DTensor parameter's local shard starts in the whole parameter, in elements of its flattening
    (exact for row sharding, Shard(0); other placements get a distinct offset per shard)."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    strides = _torch.empty(p.shape, device="meta").stride()
    return sum(o * s for o, s in zip(offset, strides))


def _like(local, p):
    """A state tensor made on ``p``'s local shard, as a DTensor laid out like ``p`` (a per-row state of a
    row-sharded parameter follows its rows)."""
    from torch.distributed.tensor import DTensor
    shape = tuple(p.shape) if local.dim() == p.dim() and local.shape[1:] == p.to_local().shape[1:] and \
        local.numel() == p.to_local().numel() else (p.shape[0],) + tuple(local.shape[1:])
    stride = tuple(p.stride()) if shape == tuple(p.shape) else _torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=shape, stride=stride)


def _to_group_keys(cls_name, kwargs, defaults=None) -> dict:
    """MXNet names -> group keys (torch's lr / weight_decay / betas); reject both spellings at once.

    A lone ``beta1`` or ``beta2`` is completed from ``defaults['betas']``."""
    out = {}
    for key, value in kwargs.items():
        if key in _REJECTED:
            raise TypeError(f"{cls_name}(): {key!r} is not supported by the torch face: use param groups and "
                            "torch.optim.lr_scheduler")
        out_key = _TORCH_NAMES.get(key, _SHORT_NAMES.get(key, key))
        if out_key in out:
            short = {v: k for k, v in _SHORT_NAMES.items()}.get(out_key)
            name, alias = (out_key, short) if short else (key, out_key)
            raise TypeError(f"{cls_name}() got both {name!r} and its alias {alias!r}")
        out[out_key] = value
    if "beta1" in out or "beta2" in out or "betas" in out:
        if "betas" in out and ("beta1" in out or "beta2" in out):
            raise TypeError(f"{cls_name}() got both 'betas' and 'beta1'/'beta2'")
        if "betas" not in out:
            b1, b2 = (defaults or {}).get("betas", (None, None))
            out["betas"] = (out.pop("beta1", b1), out.pop("beta2", b2))
        elif not (isinstance(out["betas"], (tuple, list)) and len(out["betas"]) == 2):
            raise ValueError(f"betas={out['betas']!r} is invalid: expected a pair (beta1, beta2)")
        else:
            out["betas"] = tuple(out["betas"])
    return out


_CLASSES: dict = {}


def _face(record):
    cls = _CLASSES.get(record.cls)
    if cls is None:
        doc = (f"``torch.optim.Optimizer`` face of :class:`{record.cls.__module__}.{record.cls.__name__}`.\n\n"
               f"{record.description}\n\n" + (record.cls.__doc__ or ""))
        cls = type(record.cls.__name__, (OptzooOptimizer,), {"optimizer_class": record.cls, "__doc__": doc,
                                                             "__module__": __name__})
        _CLASSES[record.cls] = cls
    return cls


def create(name, params, **kwargs) -> OptzooOptimizer:
    """The torch face of a registered optimizer, by (case-insensitive) name."""
    return _face(_registry.get_record(name))(params, **kwargs)


def __getattr__(attr):
    for record in _registry.records():
        if record.cls.__name__ == attr:
            return _face(record)
    raise AttributeError(f"module 'optzoo.torch' has no attribute {attr!r}")


def __dir__():
    return sorted(set(globals()) | {r.cls.__name__ for r in _registry.records()})


def _OptzooOptimizer_restore_wide_states(optimizer):
    restore_wide_states(optimizer, getattr(optimizer, "_loading", None))
