"""Large tensors in place: the executor's form for tensors of at least :data:`~.engine.LARGE` elements.

Each large tensor with a flat form (a 1-D view of its weight, gradient and states; per-row states keep their
2-D views) is one member of a compiled call of its graph key, :data:`~.engine.GROUP` members per call
(:func:`~.engine._run_groups`). A step over the same tensors as a recent one reuses that step's work
(:class:`_LargePlan`): the views, the keys, and the compiled calls its second step made, replayed with the new
gradients and scalars (:class:`~._direct.Replay`). Everything is checked and planned before the first kernel runs.
"""
from __future__ import annotations

import itertools
import operator

import torch

from . import _direct, _tree
from . import engine as _engine
from ._numerics import WHOLE, Key


def run(opt, layouts, kinds, large, weights, grads, states, scalars, cache, lows):
    """The large tensors (indices ``large``) with a flat form updated in place, graph by graph
    (:func:`~.engine._run_groups`); the set of those updated (the others are packed). Everything is checked and
    planned before the first kernel runs.

    A step over the same tensors as a recent one reuses that step's work (:class:`_LargePlan`: the 1-D views of
    the weights and states, each one's graph key without its scalars' part, and the compiled calls the step
    made), checked in C-level maps: the weights at the same addresses with the same shapes, the same state
    tensors at the same addresses, everything contiguous. Only the gradients' views and the scalars' tensors
    are made anew, and the recorded calls made again with them (:class:`~._direct.Replay`)."""
    if not large:
        return set()
    plans = _engine._kept(opt, "_large_plans", _PLANS_KEPT)
    ws = [weights[k] for k in large]
    ptrs = tuple(map(torch.Tensor.data_ptr, ws))
    plan = plans.get(ptrs)
    groups, tape = None, None
    if plan is not None:
        got = None
        if plan.same(opt, layouts, kinds, large, ws, grads, states, lows):
            made = plan.scalars(large, scalars, cache)  # (None: drawn noise, per-element tensors)
            if made is not None:
                if plan.replay(opt, large, grads, made):
                    return set(large)
                got = plan.groups(large, grads, made[0])
        if got is None:
            plans.pop(ptrs, None)
            plan = None
        else:
            groups, views = got
            tape = [] if plan.calls is None else None  # recorded once: the calls of the plan's second step
    if groups is None:
        groups, placed, plan = _placed_large(opt, layouts, kinds, large, weights, grads, states, scalars, cache,
                                             lows)
        if plan is not None:
            plans[ptrs] = plan
    else:
        placed = set(large)
    for key, members in groups.items():
        _engine._run_groups(opt, key, members, tape)
    if tape is not None:
        plan.record(tape, views, made)
    return placed


def _placed_large(opt, layouts, kinds, large, weights, grads, states, scalars, cache, lows):
    """The large tensors (indices ``large``) grouped by compiled graph: ``{key: members}`` (:func:`_in_place`'s
    keys and arguments), the set of indices placed (the others have no flat form: they are packed), and the
    :class:`_LargePlan` of the step where it can be one (else None)."""
    groups, placed, entries = {}, set(), []
    for k in large:
        got = _in_place(opt, layouts[kinds[k]], weights[k], grads[k], states[k], scalars[k], cache, lows[k])
        if got is not None:  # grouped with the large tensors that share its compiled graph
            groups.setdefault(got[0], []).append(got[1])
            placed.add(k)
            entries.append(got)
    plan = None if len(placed) != len(large) else _LargePlan.make(opt, layouts, kinds, large,
                                                                   [weights[k] for k in large], states, scalars,
                                                                   lows, entries)
    return groups, placed, plan


#: Sets of large tensors whose :class:`_LargePlan` an optimizer keeps (the oldest dropped beyond).
_PLANS_KEPT = 4


class _LargePlan:
    """What a step over the same large tensors can reuse from an earlier one (see :func:`run`): each tensor's 1-D
    views of the weight and states and its graph key less the scalars' part, and the compiled calls of the plan's
    second step (:meth:`record`, :meth:`replay`). Made only where every tensor was placed, everything is
    contiguous, and no scalar is a tensor (drawn noise) and no fp16/bf16 copy is written; the views keep the
    memory they view, so an address seen again is the same memory."""

    __slots__ = ("cls", "layouts", "kinds", "shapes", "leaves", "leaf_ptrs", "entries", "paired", "sdt", "calls",
                 "part")

    @classmethod
    def make(cls, opt, layouts, kinds, large, ws, states, scalars, lows, entries):
        """The plan of a step that placed every one of the ``large`` tensors (``entries``: their keys and
        arguments, in order), or None where it would not be reusable."""
        if any(lows[k] is not None for k in large):
            return None
        if any(isinstance(x, torch.Tensor) for k in large for x in scalars[k]):
            return None
        leaves = list(itertools.chain.from_iterable(_tree.leaves(states[k]) for k in large))
        if not all(map(torch.Tensor.is_contiguous, itertools.chain(ws, leaves))):
            return None
        plan = cls()
        plan.cls, plan.layouts = type(opt), dict(layouts)
        plan.kinds = [kinds[k] for k in large]
        plan.shapes = list(map(_engine._SHAPE, ws))
        plan.leaves, plan.leaf_ptrs = leaves, list(map(torch.Tensor.data_ptr, leaves))
        # per tensor: the weight's and states' views, how the gradient is viewed (1-D, in pairs, or as it is),
        # the key's parts
        plan.entries = [(m[0], m[2], _pair_views if isinstance(m[0], tuple) else
                         _engine._view_1d if m[0].dim() == 1 else None, key[:_engine._KINDS],
                         key[_engine._KINDS + 1:], _engine._scalar_dtype(_first(m[0]), _tree.leaves(m[2])))
                        for key, m in entries]
        plan.paired = [j for j, e in enumerate(plan.entries) if e[2] is _pair_views]  # (their keys are checked)
        sdts = {e[5] for e in plan.entries}
        plan.sdt = sdts.pop() if len(sdts) == 1 else None  # the scalars' one dtype, where replays may share them
        plan.calls = None  # the compiled calls, recorded at the next step (:meth:`record`)
        plan.part = None  # which tensors shared a tuple of scalars in the step recorded
        return plan

    def same(self, opt, layouts, kinds, large, ws, grads, states, lows):
        """Whether this step's large tensors are the plan's step's: the same weights' shapes (the caller found
        their addresses), the same state tensors at the same addresses, everything contiguous."""
        if type(opt) is not self.cls or layouts != self.layouts or [kinds[k] for k in large] != self.kinds \
                or list(map(_engine._SHAPE, ws)) != self.shapes or not all(map(torch.Tensor.is_contiguous, ws)):
            return False
        leaves = list(itertools.chain.from_iterable(_tree.leaves(states[k]) for k in large))
        if len(leaves) != len(self.leaves) or not all(map(operator.is_, leaves, self.leaves)) or \
                list(map(torch.Tensor.data_ptr, leaves)) != self.leaf_ptrs or \
                not all(map(torch.Tensor.is_contiguous, leaves)):
            return False
        return all(map(torch.Tensor.is_contiguous, map(grads.__getitem__, large))) and \
            not any(lows[k] is not None for k in large)

    def groups(self, large, grads, tsof):
        """This step's ``{key: members}`` and the gradients as the members hold them (after :meth:`same`);
        ``tsof``: each tensor's scalars' tensors (:meth:`scalars`)."""
        dims, groups, views = {}, {}, self._views(large, grads)
        for (fw, finner, flat, head, tail, _), g, ts in zip(self.entries, views, tsof):
            kinds = dims.get(id(ts))
            if kinds is None:
                kinds = dims[id(ts)] = _engine._scalar_kinds(ts)
            groups.setdefault(head + (kinds,) + tail, []).append((fw, g, finner, ts, None))
        return groups, views

    def _views(self, large, grads):
        """The gradients as the members hold them: 1-D views (2-D for per-row states; in pairs, PAIRS)."""
        return [e[2](grads[k]) if e[2] else grads[k] for e, k in zip(self.entries, large)]

    def scalars(self, large, scalars, cache):
        """Each tensor's scalars as 0-d tensors (made once per distinct tuple: prepare's one tuple for every tensor in
        the common case) and which tensors share a tuple of them (:func:`_pattern`; None where all do), or None where
        a scalar is a tensor (drawn noise). The executor's calls pass one tuple to a group whose members share it,
        else a tuple per member (Nadam's schedule, SGLD's noise keys): the sharing is part of what a call is."""
        tuples = list(map(scalars.__getitem__, large))
        if self.paired and not all(_pairs_key(tuples[j]) for j in self.paired):
            return None  # a key that takes no pairs (planned anew)
        s = tuples[0]
        if self.sdt is not None and all(map(operator.is_, tuples, itertools.repeat(s))):  # the common case
            if any(isinstance(x, torch.Tensor) for x in s):
                return None
            return [_engine._as_tensors(s, self.sdt, _first(self.entries[0][0]).device, cache)] * len(tuples), None
        made, out = {}, []
        for s, e in zip(tuples, self.entries):
            got = made.get((id(s), e[5]))
            if got is None:
                if any(isinstance(x, torch.Tensor) for x in s):
                    return None
                got = made[(id(s), e[5])] = _engine._as_tensors(s, e[5], _first(e[0]).device, cache)
            out.append(got)
        part = _pattern(out)
        return out, part if any(part) else None

    def record(self, tape, views, made):
        """The compiled calls of a step (``tape``: :func:`~.engine._run_groups`' ``(key, step, args)``, made with the
        members of :meth:`groups`, whose gradients are ``views`` and scalars ``made`` by :meth:`scalars`), kept for
        :meth:`replay` where each would be called directly; else none are kept. Each call's variable part (its
        members' gradients and scalars' tensors) is recorded with which of them are one tensor (:func:`_pattern`: a
        value shared by several members' tuples)."""
        self.calls = ()
        tsof, self.part = made
        place = {id(g): j for j, g in enumerate(views)}
        calls = []
        for key, step, args in tape:
            if step not in _engine._DIRECT_STEPS:
                return
            _, at_g, at_s = _engine._DIRECT_STEPS[step]
            group = at_g is not None and isinstance(args[at_g], list)
            gs = [] if at_g is None else args[at_g] if group else [args[at_g]]
            slots = [pos for pos, g in enumerate(gs) if id(g) in place]  # (a group's stand-ins stay)
            mine = [place[id(gs[pos])] for pos in slots]
            shared, svar = None, []
            if at_s is not None:
                own, given = [tsof[j] for j in mine], args[at_s]
                shared = not isinstance(given, list)  # one tuple for the whole call, else one per member
                if not own or any(t is not (given if shared else given[pos]) for pos, t in zip(slots, own)):
                    return
                svar = _scalar_part(own, shared)
            var = _pieces(gs[pos] for pos in slots) + svar
            pattern = _pattern(var)
            if pattern == tuple(range(len(var))):
                pattern = None  # all distinct (always, where the call has one tuple): Replay.inputs checks that
            rep = _direct.Replay.make(key, args, var if pattern is None else _firsts(var, pattern))
            if rep is None:
                return
            rest = list(args[1:])  # the arguments but the optimizer, without this step's gradients and scalars
            if at_g is not None:
                rest[at_g - 1] = [None if pos in slots else g for pos, g in enumerate(gs)] if group else None
            if at_s is not None:
                rest[at_s - 1] = None if shared else [None if pos in slots else t for pos, t in enumerate(given)]
            calls.append((rep, mine, key, step, rest, slots, at_g, at_s, shared, pattern))
        self.calls = tuple(calls)

    def replay(self, opt, large, grads, made):
        """This step's large tensors by the recorded calls (after :meth:`same`): True, or False where none are
        recorded, or a call's checks fail, or its scalars are shared otherwise than in the recorded step (then
        nothing ran, and the calls are recorded again). Every call's inputs are made before the first kernel runs.
        A record of no calls (a call that :func:`~._direct.run` would not make directly) stays until the scalars'
        sharing changes."""
        if self.calls is None:
            return False
        tsof, part = made  # (:meth:`scalars`)
        if part != self.part:  # (Nadam's schedules agree from some step on: recorded again, the calls' keys differ)
            self.calls = None
            return False
        if not self.calls:
            return False
        views = self._views(large, grads)
        if opt.clip_gradient:
            opt._clip_bounds()
        now = _direct.step_checks(opt)
        inputs = []
        for rep, mine, _, _, _, _, _, at_s, shared, pattern in self.calls:
            var = _pieces(views[j] for j in mine)
            if at_s is not None:
                var += _scalar_part([tsof[j] for j in mine], shared)
            if pattern is None:
                args = rep.inputs(opt, var, now)
            else:
                args = rep.inputs(opt, _firsts(var, pattern), now) if _pattern(var) == pattern else None
            if args is None:
                self.calls = None
                return False
            inputs.append(args)
        for (rep, mine, key, step, rest, slots, at_g, at_s, shared, _), args in zip(self.calls, inputs):
            if rep.run(opt, args):
                continue
            # refused (a size or stride the graph does not take, asserted before any write): through dynamo
            self.calls = None  # recorded again at the next step
            args = list(rest)
            if at_g is not None:
                if isinstance(args[at_g - 1], list):
                    args[at_g - 1] = list(args[at_g - 1])
                    for pos, j in zip(slots, mine):
                        args[at_g - 1][pos] = views[j]
                else:
                    args[at_g - 1] = views[mine[0]]
            if at_s is not None:
                if shared:
                    args[at_s - 1] = tsof[mine[0]]
                else:  # the members' tuples, the stand-ins' of their own (no tensor shared with a member)
                    last = tsof[mine[-1]]
                    args[at_s - 1] = [tsof[j] for j in mine] + [tuple(x.clone() for x in last)
                                                                 for _ in range(len(args[at_s - 1]) - len(mine))]
            stand_ins = _engine._distinct if step is _engine._group_step else None
            _engine._run(True, key, opt, *args, step=step, stand_ins=stand_ins)
        return True


def _pieces(gradients):
    """The members' gradients as a call's variable tensors: each one, or each of its views in pairs (PAIRS)."""
    out = []
    for g in gradients:
        if isinstance(g, tuple):
            out.extend(g)
        else:
            out.append(g)
    return out


def _first(w):
    return w[0] if isinstance(w, tuple) else w


def _pair_views(g):
    """A contiguous gradient as its weight's kernel takes it in pairs (:func:`_halves` of its 1-D view)."""
    return _halves(g.view(-1))


def _scalar_part(own, shared):
    """A call's scalars' tensors in the order its variable part lists them: the one tuple, or each member's."""
    return list(own[0]) if shared else [x for t in own for x in t]


def _pattern(xs):
    """For each of ``xs``, the first place holding the same object: which are one object (computed in C)."""
    first = {}
    return tuple(map(first.setdefault, map(id, xs), itertools.count()))


def _firsts(xs, pattern):
    """``xs`` without repeats (the first of each object), as a call's distinct variable tensors."""
    return [x for k, (x, p) in enumerate(zip(xs, pattern)) if k == p]


def _in_place(opt, layout, w, g, inner, s, cache, low=None):
    """A large tensor's in-place kernel call: its graph's key and arguments (1-D views of the weight, gradient,
    states and fp16/bf16 copy, the scalars as tensors, the reduction); None when its layout has no flat form
    (then it is packed)."""
    leaves = _tree.leaves(inner)
    if low is not None:
        leaves.append(low)
    if layout == "rows":
        if not (w.is_contiguous() and g.is_contiguous() and all(map(torch.Tensor.is_contiguous, leaves))):
            return None
        fw, fg, finner, seg, flow = w, g, inner, None, low
    else:
        if w.is_contiguous() and g.is_contiguous() and all(map(torch.Tensor.is_contiguous, leaves)):
            fw, fg, finner = w.view(-1), g.view(-1), _engine._map(inner, _engine._view_1d)  # the common case
        else:
            fw, fg = _engine._flat(w), _engine._flat(g)
            if fw is None or fg is None or g.stride() != w.stride() or any(x.stride() != w.stride() for x in leaves):
                return None
            finner = _engine._map(inner, _engine._flat)
        flow = None if low is None else _engine._flat(low)
        seg = WHOLE if layout == "norms" else None  # per-tensor sums: full reductions of the 1-D views
        if _paired(opt, layout, fw, finner, s):
            fw, fg = _halves(fw), _halves(fg)
            flow = None if flow is None else _halves(flow)
    sdt = _engine._scalar_dtype(_first(fw), leaves)
    if any(isinstance(x, torch.Tensor) for x in s):  # per-element scalars (drawn noise) laid out as the weight
        if layout != "rows":  # (never PAIRS: see _paired)
            s = tuple(_engine._flat(x).view(fw.shape) if isinstance(x, torch.Tensor) else x for x in s)
        ts = tuple(_engine._scalar_tensor(x, sdt, w.device) for x in s)
    else:
        ts = _engine._as_tensors(s, sdt, w.device, cache)
    return _engine._key(opt, layout, fw, finner, ts, flow) + (seg,), (fw, fg, finner, ts, flow)


def _paired(opt, layout, fw, inner, s):
    """Whether a large weight's kernel takes it in pairs (:data:`~.engine.PAIRS`): a rule that makes its noise in
    pairs (``_kernel_pairs``), without states, on the CPU, a key that is a multiple of PAIRS (a local shard's
    from an offset that is not: element by element, the same bits), a weight of a block or more."""
    return getattr(opt, "_kernel_pairs", False) and layout == "elementwise" and inner is None and \
        fw.device.type == "cpu" and fw.numel() >= _engine.PAIRS and _pairs_key(s)


def _pairs_key(s):
    """Whether a tuple of scalars ends in a noise key whose counters' blocks are its weight's (a multiple of PAIRS)."""
    return bool(s) and isinstance(s[-1], Key) and s[-1] % _engine.PAIRS == 0


def _halves(t):
    """A 1-D tensor as the halves of its blocks of :data:`~.engine.PAIRS` elements (two ``[blocks, PAIRS/2]``
    views), then the rest where there is one."""
    n = t.numel() - t.numel() % _engine.PAIRS
    blocks = t[:n].view(-1, _engine.PAIRS)
    half = _engine.PAIRS // 2
    return (blocks[:, :half], blocks[:, half:]) + ((t[n:],) if n < t.numel() else ())
