"""The torch face's per-parameter state: MXNet's state tree as named tensors in ``optimizer.state[p]``.

MXNet's optimizers keep a state as a nested tuple (Adam: ``(mean, var)``; multi-precision:
``(weight32, (mean, var))``). torch's tools (``state_dict`` casting, distributed checkpoint, inspection)
expect a flat dict of named tensors per parameter, so the face stores the tree's leaves under names — the
optimizer's ``state_names`` (its docstring's symbols) and ``weight32`` for a multi-precision master copy —
and rebuilds the tree from them at each step (a cached skeleton per optimizer, dtype and shape).
"""
from __future__ import annotations

import math
import numbers
import operator

import torch

__all__ = ["layout", "named", "tree_of", "trees_of", "check_state_dict", "restore_wide_states"]


class Layout:
    """The state of one optimizer for weights of one dtype and shape: leaf names, expected (shape, dtype) of
    each leaf, and the tree's skeleton (leaf positions in place of tensors)."""

    __slots__ = ("names", "specs", "skeleton", "getter")

    def __init__(self, opt, weight):
        meta = torch.empty(weight.shape, dtype=weight.dtype, device="meta")
        tree = opt.create_state_multi_precision(0, meta)
        leaves = []
        self.skeleton = _skeleton(tree, leaves)
        master, inner = None, tree
        if opt._mp(meta):
            master, inner = opt._split_mp(tree)
        # the optimizer's state_names name the slots of its state (a tensor, or a tuple of tensors and Nones)
        slots = list(inner) if isinstance(inner, tuple) else [inner]
        declared = tuple(getattr(opt, "state_names", ()))
        named = {id(t): n for t, n in zip(slots, declared) if t is not None} if len(declared) == len(slots) else {}
        own = [leaf for leaf in leaves if leaf is not master]
        generic = ["state"] if len(own) == 1 else [f"state{k}" for k in range(len(own))]
        fallback = dict(zip(map(id, own), generic))
        self.names = ["weight32" if leaf is master else named.get(id(leaf), fallback[id(leaf)]) for leaf in leaves]
        self.specs = [(tuple(leaf.shape), leaf.dtype) for leaf in leaves]
        # the tree straight from a state dict in C (operator.itemgetter), where it is the leaves themselves:
        # one tensor, or a flat tuple of tensors (every optimizer's state but multi-precision ones)
        sk = self.skeleton
        self.getter = (operator.itemgetter(self.names[0]) if sk == 0 else
                       operator.itemgetter(*self.names) if isinstance(sk, tuple) and len(sk) > 1
                       and sk == tuple(range(len(sk))) else None)


def _skeleton(tree, leaves):
    if tree is None:
        return None
    if isinstance(tree, torch.Tensor):
        leaves.append(tree)
        return len(leaves) - 1
    return tuple(_skeleton(t, leaves) for t in tree)


def _fill(skeleton, values):
    if skeleton is None:
        return None
    if isinstance(skeleton, int):
        return values[skeleton]
    return tuple(_fill(s, values) for s in skeleton)


def layout(opt, weight) -> Layout:
    cache = opt.__dict__.setdefault("_face_layouts", {})
    key = (weight.dtype, tuple(weight.shape))
    got = cache.get(key)
    if got is None:
        got = cache[key] = Layout(opt, weight)
    return got


def named(lay: Layout, tree) -> dict:
    leaves = []
    _skeleton(tree, leaves)
    return dict(zip(lay.names, leaves))


def tree_of(lay: Layout, state: dict):
    sk = lay.skeleton
    if sk is None:
        return None
    if lay.getter is not None:  # one tensor or a flat tuple of them, without the recursion
        return lay.getter(state)
    return _fill(sk, [state[name] for name in lay.names])


def trees_of(layouts: dict, keys: list, states: list) -> list:
    """:func:`tree_of` of every state dict in ``states``, ``keys[k]`` naming its layout in ``layouts``: in one
    C-level map when every layout has the same flat tree (the common case: one state layout for every shape)."""
    lays = list(layouts.values())
    first = lays[0]
    if all(lay.skeleton == first.skeleton and lay.names == first.names for lay in lays):
        if first.skeleton is None:  # no state (SGD without momentum)
            return [None] * len(states)
        if first.getter is not None:
            return list(map(first.getter, states))
    return list(map(tree_of, map(layouts.__getitem__, keys), states))


def _pairs(opt, state_dict):
    """(saved id, parameter, group index) in torch's order: saved groups matched to ours by position."""
    out = []
    for g, (saved, group) in enumerate(zip(state_dict["param_groups"], opt.param_groups)):
        out += [(sid, p, g) for sid, p in zip(saved["params"], group["params"])]
    return out


def check_state_dict(opt, state_dict) -> None:
    """Everything torch's ``load_state_dict`` would apply, checked before it applies any of it."""
    name = type(opt).__name__
    if not (isinstance(state_dict, dict) and isinstance(state_dict.get("state"), dict)
            and isinstance(state_dict.get("param_groups"), list)):
        raise ValueError(f"state_dict is not an optimizer state dict: expected a dict with 'state' (a dict) and "
                         f"'param_groups' (a list), as {name}.state_dict() returns")
    groups = state_dict["param_groups"]
    if len(groups) != len(opt.param_groups):
        raise ValueError(f"state_dict has {len(groups)} param groups: this optimizer has {len(opt.param_groups)}")
    inners, ids = [], {}
    for g, (saved, group) in enumerate(zip(groups, opt.param_groups)):
        if not isinstance(saved, dict):
            raise ValueError(f"state_dict param group {g} is a {type(saved).__name__}: expected a dict")
        params = saved.get("params")
        if not isinstance(params, (list, tuple)):
            raise ValueError(f"state_dict param group {g} has 'params' = {_short(params)}: expected a list of "
                             f"{len(group['params'])} parameter ids")
        if len(params) != len(group["params"]):
            raise ValueError(f"state_dict param group {g} has {len(params)} parameters: expected {len(group['params'])}")
        for k, sid in enumerate(params):
            if isinstance(sid, bool) or not isinstance(sid, (int, str)):
                raise ValueError(f"state_dict param group {g}: parameter id {_short(sid)} at position {k} is "
                                 "invalid: expected an int (as state_dict writes them)")
            if sid in ids:
                raise ValueError(f"state_dict param group {g}: parameter id {sid!r} at position {k} is also in "
                                 f"group {ids[sid]}: expected each id once")
            ids[sid] = g
        merged = {**group, **{k: v for k, v in saved.items() if k != "params"}}
        try:
            inner = opt.optimizer_class(**opt._mx_kwargs(merged))
        except (TypeError, ValueError, KeyError) as exc:
            raise ValueError(f"state_dict param group {g}: {exc}") from None
        book = merged.get("optzoo", {})
        if not isinstance(book, dict):
            raise ValueError(f"state_dict param group {g} has 'optzoo' = {_short(book)}: expected a dict")
        for attr in inner._step_vars:
            if attr in book:
                _check_book(f"state_dict param group {g}: 'optzoo'[{attr!r}]", attr, book[attr], getattr(inner, attr))
        inners.append(inner)
    for sid, p, g in _pairs(opt, state_dict):
        entry = state_dict["state"].get(sid)
        if entry is None:
            continue
        where = f"state_dict state of parameter {sid} (group {g})"
        if not isinstance(entry, dict):
            raise ValueError(f"{where} is a {type(entry).__name__}: expected a dict of named tensors")
        step = entry.get("step")
        if isinstance(step, torch.Tensor) and step.numel() == 1:
            step = step.item()
        if not _count(step):
            raise ValueError(f"{where} has step={_short(entry.get('step'))}: expected an integer >= 0")
        for key, value in entry.items():  # torch's load recurses into every value: no cycles
            if not _acyclic(value, set()):
                raise ValueError(f"{where}: {key!r} holds itself (a cyclic container): expected tensors and "
                                 "plain values")
        lay = layout(inners[g], p)
        for leaf, (shape, _) in zip(lay.names, lay.specs):
            value = entry.get(leaf)
            if (not isinstance(value, torch.Tensor) or tuple(value.shape) != shape or not value.is_floating_point()
                    or value.layout != torch.strided or value.is_meta):
                got = "missing" if value is None else (
                    f"Tensor{tuple(value.shape)}:{value.dtype}:{value.layout}:{value.device}"
                    if isinstance(value, torch.Tensor) else type(value).__name__)
                raise ValueError(f"{where}: {leaf!r} is {got}: expected a dense floating-point tensor with data, "
                                 f"of shape {shape} "
                                 f"({type(opt).__name__} keeps {', '.join(lay.names) or 'no tensors'})")


def _short(value) -> str:
    text = repr(value) if not isinstance(value, (dict, list, tuple)) else f"a {type(value).__name__}"
    return text if len(text) <= 60 else text[:57] + "..."


def _count(value) -> bool:
    """An integer >= 0 (an integral float too, as torch's ``step``), finite, not a bool."""
    return (not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value) and value >= 0
            and value == int(value))


def _finite(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)


def _acyclic(value, seen) -> bool:
    if not isinstance(value, (dict, list, tuple)):
        return True
    if id(value) in seen:
        return False
    seen.add(id(value))
    ok = all(_acyclic(v, seen) for v in (value.values() if isinstance(value, dict) else value))
    seen.discard(id(value))
    return ok


def _check_book(where, attr, value, fresh) -> None:
    """A saved piece of step bookkeeping, of the kind the optimizer keeps (``fresh``: its value on a new one):
    ``num_update`` a count; a number (or None where the optimizer starts with None) finite; a dict (LBSGD's
    per-index accumulators) of index -> dict of finite numbers or tensors."""
    if attr == "num_update":
        ok = _count(value)
        expected = "an integer >= 0"
    elif isinstance(fresh, dict):
        ok = isinstance(value, dict) and all(
            isinstance(entry, dict) and all(isinstance(v, torch.Tensor) or _finite(v) for v in entry.values())
            for entry in value.values())
        expected = "a dict of index -> dict of finite numbers or tensors"
    else:
        ok = _finite(value) or (fresh is None and value is None)
        expected = "a finite number" + (" or None" if fresh is None else "")
    if not ok:
        raise ValueError(f"{where}={_short(value)} is invalid: expected {expected}")


def restore_wide_states(opt, source) -> None:
    """After torch's ``load_state_dict`` (which casts every floating state to its parameter's dtype): the
    states this optimizer keeps wider than the weight (fp32 master copies and states under multi_precision,
    GroupAdaGrad's fp32 history) are taken again from the loaded values, in their own dtype."""
    if source is None:
        return
    for sid, p, g in _pairs(opt, source):
        entry = source["state"].get(sid)
        st = opt.state.get(p)
        if entry is None or not isinstance(st, dict):
            continue
        lay = layout(opt._inner_for(opt.param_groups[g], g), p)
        for leaf, (_, dtype) in zip(lay.names, lay.specs):
            if leaf in st and st[leaf].dtype != dtype:
                st[leaf] = entry[leaf].to(device=p.device, dtype=dtype, copy=True)
