"""Two-phase rules on the CPU: the executor's form for large tensors of an optimizer whose ``kernel`` is
``second_phase(w, *first_phase(w, g, state, s, seg))`` (its record ``_two_phase``, LAMB).

One fused loop must make the per-tensor sums before any weight moves, so the compiled step is two loops over
the tensor, and the second recomputes the first's direction :math:`u`. LAMB's :math:`u` costs a root and a
division per element: computed twice, the step is compute-bound on a CPU (one 16M tensor, 2 threads: ~2.1x
torch fused Adam's time). Here the first compiled call writes the states, :math:`u` and the step's scale into
buffers kept by the optimizer (one per place in a call, as large as the largest tensor it has held); the second
reads them and moves the weights (~1.75x). Both update in place and return nothing, so that their steady-state
calls skip dynamo (:mod:`._direct`). The arithmetic is the same
operations on the same values (:math:`u` is stored at a width that holds it exactly), so the numbers are the
fused graph's. Accelerators keep the fused graph: there the recomputation is cheaper than the traffic.
"""
from __future__ import annotations

import functools
import itertools
import operator

import torch

from . import engine as _engine


def wanted(opt, key) -> bool:
    """Whether the large tensors of graph ``key`` (the executor's) run in two phases."""
    return opt._two_phase and key[3] == "cpu"


def run(opt, key, seg, members, group, tape=None):
    """``members`` (the executor's ``(w, g, inner, scalars, low)`` of one graph key, 1-D views) in chunks of
    ``group``, two compiled calls per chunk. A last, shorter chunk is filled up with small stand-in members kept
    by the optimizer (a few dozen elements each): one pair of graphs per key, not a second pair for the rest
    (each graph costs its compile time cold and ~0.3 s of loading warm; the stand-ins' loops cost microseconds).
    A lone member (one large tensor: a graph key of its own) runs alone: each member's loop ends at a barrier, and
    on a shared machine each barrier waits for a descheduled thread (one 16M tensor under a busy process per core,
    padded to four: 3.3x torch fused Adam's time). ``tape``: as :func:`~.engine._run_groups`'."""
    if len(members) == 1:
        group = 1
    for start in range(0, len(members), group):
        chunk = members[start:start + group]
        ws, gs, inners, tss, lows = map(list, zip(*chunk))
        # the scale's dtype: LAMB's, lr * r1 / r2 or lr, 0-d tensors of the weight's and the scalars' dtypes
        sdt = torch.promote_types(ws[0].dtype, tss[0][0].dtype)
        us, scales = _buffers(opt, ws, sdt)
        if len(chunk) < group:
            pad = _padding(opt, key, chunk[0], group - len(chunk), sdt)
            for got, extra in zip((ws, gs, inners, lows, us, scales), pad):
                got.extend(extra)
            tss.extend(_engine._padding_scalars(members, group - len(chunk)))
        shared = all(map(operator.is_, tss, itertools.repeat(tss[0])))
        lows = lows if lows[0] is not None else None
        sub = key + ("phases", group, shared)
        first = (opt, ws, gs, inners, tss[0] if shared else tss, seg, us, scales)
        _engine._run(True, sub + ("first",), *first, step=_first, stand_ins=_first_stand_ins)
        second = (opt, ws, us, scales, lows)
        _engine._run(True, sub + ("second",), *second, step=_second, stand_ins=_second_stand_ins)
        if tape is not None:
            tape += [(sub + ("first",), _first, first), (sub + ("second",), _second, second)]


def _padding(opt, key, member, n, sdt):
    """``n`` stand-in members like ``member`` (:func:`~.engine.padding`) and a direction and a scale (of dtype
    ``sdt``) for each, as ``(ws, gs, inners, lows, us, scales)``."""
    parts = _engine.padding(opt, key, member, n)
    cache = opt.__dict__.setdefault("_phases", {})
    k = ("phase_directions", key, sdt)
    got = cache.get(k)
    if got is None or len(got[0]) < n:
        w = member[0]
        u_dtype = torch.promote_types(w.dtype, torch.float32)
        got = cache[k] = ([torch.zeros(p[0].numel(), dtype=u_dtype, device=w.device) for p in parts],
                          [torch.zeros(1, dtype=sdt, device=w.device) for _ in parts])
    ws, gs, inners, lows = map(list, zip(*parts))
    return ws, gs, inners, lows, got[0][:n], got[1][:n]


def _first(opt, ws, gs, inners, s, seg, us, scales):
    """Phase 1 of each tensor: its states written, its direction stored in ``us`` and its scale in ``scales``."""
    per = isinstance(s, list)
    for k in range(len(ws)):
        w = ws[k]
        u, new_s, scale = type(opt).first_phase(opt, w, gs[k].to(w.dtype), inners[k], s[k] if per else s, seg)
        _engine._write(inners[k], new_s)
        us[k].copy_(u)
        if scale.dtype != scales[k].dtype:  # (checked at tracing)
            raise TypeError(f"a two-phase rule's scale is {scale.dtype}, expected {scales[k].dtype}: the promoted "
                            "dtype of the weight and its scalars")
        scales[k].copy_(scale)


def _second(opt, ws, us, scales, lows):
    """Phase 2 of each tensor: the weight from its stored direction (and its fp16/bf16 copy rounded)."""
    for k in range(len(ws)):
        ws[k].copy_(type(opt).second_phase(opt, ws[k], us[k], scales[k]))
        if lows is not None:
            lows[k].copy_(ws[k])


def _buffers(opt, ws, sdt):
    """A direction and a scale per weight, in buffers the optimizer keeps, one per place in a chunk (grown to the
    largest weight it has held): separate memory, so that the compiled calls may be direct ones
    (:mod:`._direct`). Directions wide enough to hold one computed in fp32 or in the weight dtype exactly (fp32,
    or fp64 for fp64 weights). Scales of the scale's own dtype ``sdt`` and of shape ``(1,)``: a compiled
    ``copy_`` into a 0-d fp64 input is lost (torch 2.13, CPU), and of another dtype it would round."""
    dtype = torch.promote_types(ws[0].dtype, torch.float32)
    cache = opt.__dict__.setdefault("_phases", {})
    key = ("phases", dtype, sdt, ws[0].device)
    bufs, scales = cache.setdefault(key, ([], []))  # a cache of its own: packs' scratch buffers are dropped oldest
    for k, w in enumerate(ws):                      # first
        if k == len(bufs):
            bufs.append(torch.empty(0, dtype=dtype, device=w.device))
            scales.append(torch.zeros(1, dtype=sdt, device=w.device))
        if bufs[k].numel() < w.numel():
            bufs[k] = torch.empty(w.numel(), dtype=dtype, device=w.device)
    return [b[:w.numel()] for b, w in zip(bufs, ws)], scales[:len(ws)]


def _first_stand_ins(args):
    """A chunk's first compile on members of distinct sizes (as the executor's groups: no guard that two
    members are equally large, so one graph serves every pattern of sizes)."""
    opt, ws, gs, inners, s, seg, us, scales = args
    sizes = _engine.stand_in_sizes(len(ws))
    return (opt, *(_like(xs, sizes) for xs in (ws, gs)),
            [_engine._map(i, functools.partial(_engine.stand_in, n=n)) for i, n in zip(inners, sizes)], s, seg,
            _like(us, sizes), [x.clone() for x in scales])


def _second_stand_ins(args):
    opt, ws, us, scales, lows = args
    sizes = _engine.stand_in_sizes(len(ws))
    return (opt, _like(ws, sizes), _like(us, sizes), [s.clone() for s in scales],
            None if lows is None else _like(lows, sizes))


def _like(tensors, sizes):
    return [_engine.stand_in(t, n) for t, n in zip(tensors, sizes)]


#: The phases' steps, which update in place and return nothing: their steady-state calls may skip dynamo
#: (:mod:`._direct`); ``{step: where its reduction, gradients and scalars are among its arguments}``.
DIRECT_STEPS = {_first: (5, 2, 4), _second: (None, None, None)}
