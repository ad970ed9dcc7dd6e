"""The executor: one optimizer rule (``prepare`` + ``kernel``) run over many tensors, fast, in place.

The caller (``Optimizer.update``, on behalf of the Updater, the Trainer and the torch face) has checked
every input, counted and read every index and called ``prepare`` in index order; :func:`execute` then only
moves tensors. It never re-binds, re-strides or aliases a parameter or its gradient: weights are
updated in place, gradients are read, states are the caller's tensors.

- A **large** tensor (at least :data:`LARGE` elements) is updated in place (:mod:`._large`): the kernel compiled by
  ``torch.compile`` (one fused loop that reads each input once and writes each output once; one
  dynamic-shape graph per optimizer class, state layout and group length serves every size), over 1-D views
  of the weight, gradient and states (per-tensor norms are then full reductions, :data:`~._numerics.WHOLE`).
  Large tensors of one graph run :data:`GROUP` per compiled call (a loop per tensor in one parallel region):
  each call costs tens of microseconds of dynamo's and AOT autograd's wrappers (hundreds right after a kernel that
  evicted them from the caches: a call like one that dynamo ran calls its graph directly, :mod:`._direct`).
  On the CPU, a two-phase rule's (``_two_phase``: LAMB) run as two compiled calls, its direction stored between
  them (:mod:`._phases`).
- **Small** tensors of one dtype and device are packed: concatenated into scratch buffers, updated by
  one kernel call (per-parameter scalars spread per element, per-tensor norms as row sums over runs of
  equal-sized parameters, see :class:`Segments`; such packs sorted by size, :func:`pack_order`), and copied back.

Modes: ``fused=None`` (default) compiles where it pays (large tensors and large packs) and runs small
work eagerly; ``fused=True`` compiles every pack too, however small; ``fused=False`` never reaches this module (the
reference path: ``rule`` per tensor). Compiled kernels keep the reference path's numbers bit for bit
for elementwise rules (no FP contraction, the same operation order, correctly rounded roots; fp16/bf16
intermediates rounded as eager torch rounds them); per-tensor sums inside compiled kernels are fp64 sums
rounded to fp32 (the spec flags ``bucket_norms`` / ``compiled_row_sums``). Without a working compiler the
eager kernels run, with one warning.

Compiled steps get a code object of their own per optimizer class and state layout, so that dynamo's
per-function recompile limit applies to each separately: torch's and dynamo's global configuration are
never changed.
"""
from __future__ import annotations

import functools
import itertools
import operator
import types
import warnings

import torch

from . import _direct, _large, _packs, _phases, _sparse, _tree
from ._packs import (PACK_COMPILED, PACK_MIN, RUNS_AS_ROWS, Pack, Segments, adjacent, pack_order,  # noqa: F401
                     run_keys, _DEVICE, _DTYPE, _SHAPE)
from ._numerics import BLOCK, ROWS, WHOLE, Key

__all__ = ["LARGE", "Pack", "Plan", "Segments", "adjacent", "execute", "layout_of", "pack_order", "run_keys",
           "run_plan"]

#: A tensor this large (elements) is updated by itself, in place; smaller ones are packed.
LARGE = 1 << 16
#: Large tensors of one graph run this many per compiled call (one parallel region, a loop per tensor). More
#: saves little more (ResNet-50's 42 large tensors, Adam's step x torch fused Adam's time, 2 threads, paired in
#: one process: one per call 1.39, four 1.27; in another, four 1.18, eight 1.18, all in one call 1.15) and
#: costs compile time: gcc compiles one function with a loop per member (cold: one member 0.75 s, four ~2.5 s,
#: eight ~4.7 s).
GROUP = 4
#: On the CPU, a large tensor of per-tensor sums (LARS's and LAMB's norms, the ``"norms"`` layout) this large
#: (elements) runs in a call of its own. Its step reads the tensor twice, the sums first; in a group graph,
#: inductor makes every member's sums before any member's update (it fuses the members' scalar work into one
#: node), so a group of 4 members of 1M elements has read 32-64 MB before it comes back to the first: out of
#: cache again. Alone, the second pass finds the first pass's tensors in the cache. Smaller members stay grouped
#: (four of them fit in a cache together; alone, each call's ~25 us would cost more than the cache saves).
#: Measured on ResNet-50's shapes (2 threads, AMD EPYC, 32 MB L3; torch fused Adam's step time over ours, paired
#: in one process, median of 25): LARS 0.81 grouped, 0.90 with this bound; LAMB 0.57 grouped, 0.62 with it (every
#: member alone, in an earlier run: 0.91 and 0.65; but 60 tensors of 90K all alone: 0.54 and 0.43 against 0.67 and
#: 0.57 grouped). Under a busy process per core bench/ab.py cannot tell (LAMB, alone against grouped: 0.64 in one
#: run, 1.23 in the next; this tree against itself: 0.99 and 1.25).
ALONE = 1 << 18
#: On the CPU, a large weight of a rule that makes its noise in pairs (``_kernel_pairs``: SGLD, whose Box-Muller
#: draw gives two normals) is passed to its kernel as the halves of its blocks of 32 elements: two ``[blocks, 16]``
#: views (then the rest, 1-D), each its own input of the compiled graph, so that one loop computes each draw once
#: for both halves and stores into each (views made inside the graph would be written through a temporary and a
#: copy). Its key must be a multiple of 32 (the counters' blocks are the weight's); it runs one per compiled call.
#: Measured on one 16M tensor (2 threads, AMD EPYC): 16.4 ms a step element by element, 8.5 ms in pairs. Four per
#: call (as GROUP) ran ResNet-50's shapes in 0.94x the time but took the first step of five tensors of 262K from
#: 3.3 to 11.5 s cold and from 0.60 to 1.44 s warm (the group graph's four mixes).
PAIRS = BLOCK


# ------------------------------------------------------------------------------------------ the step
def _fused_step(opt, w, g, inner, s, seg, low=None):
    """One update in place: cast, kernel, write back, and round into ``low`` (the fp16/bf16 weight of an fp32
    master copy ``w``): one loop when compiled. ``w``, ``g`` and ``low`` may be tuples of views (:data:`PAIRS`)."""
    g = g.to(w.dtype) if isinstance(g, torch.Tensor) else tuple(x.to(y.dtype) for x, y in zip(g, w))
    new_w, new_s = type(opt).kernel(opt, w, g, inner, s, seg)
    _write(inner, new_s)
    _write(w, new_w)
    if low is not None:
        _write(low, w)


def _group_step(opt, ws, gs, inners, s, seg, lows=None):
    """:func:`_fused_step` on each tensor of a group (compiled: one graph, a loop per tensor); ``s`` is the
    scalars of every member, or a list of each member's."""
    per = isinstance(s, list)
    for k in range(len(ws)):
        _fused_step(opt, ws[k], gs[k], inners[k], s[k] if per else s, seg, None if lows is None else lows[k])


#: The steps whose steady-state calls skip dynamo where they can (:mod:`._direct`): updates in place, no result;
#: ``{step: where its reduction (a shard's goes through dynamo), gradients and scalars are among its arguments}``
#: (None: none), the last two for a :class:`~._large._LargePlan`'s replays.
_DIRECT_STEPS = {_fused_step: (5, 2, 4), _group_step: (5, 2, 4), **_phases.DIRECT_STEPS}


def _distinct(args):
    """Stand-ins for a group call's arguments, each member's tensors of a size of its own: a group graph's first
    compile on them has no guard that two members are equally large (dynamo's duck sizing would otherwise
    give equal sizes one symbol, and every group of another pattern of equal sizes a graph of its own)."""
    opt, ws, gs, inners, s, seg, lows = args
    sizes = stand_in_sizes(len(ws))
    return (opt, [stand_in(w, n) for w, n in zip(ws, sizes)], [stand_in(g, n) for g, n in zip(gs, sizes)],
            [_map(inner, functools.partial(stand_in, n=n)) for inner, n in zip(inners, sizes)], s, seg,
            None if lows is None else [stand_in(x, n) for x, n in zip(lows, sizes)])


def stand_in_sizes(count):
    """``count`` distinct small sizes for stand-in members (from :data:`_DISTINCT`, above dynamo's 0/1
    specialization)."""
    return [_DISTINCT + 3 * k for k in range(count)]


def stand_in(t, n):
    """A 1-D stand-in for ``t`` (its dtype and device) of ``n`` ones."""
    return torch.ones(n, dtype=t.dtype, device=t.device)


#: The first stand-in size of :func:`stand_in_sizes` (small, above dynamo's 0/1 specialization).
_DISTINCT = 67


def padding(opt, key, member, n):
    """``n`` stand-in members like ``member`` (a group member's weight, gradient, states and fp16/bf16 copy,
    1-D), of :func:`stand_in_sizes`, kept by the optimizer per graph ``key``: ``(w, g, inner, low)`` each."""
    cache = opt.__dict__.setdefault("_phases", {})
    k = ("padding", key)
    got = cache.get(k)
    if got is None or len(got) < n:
        w, g, inner, _, low = member
        got = cache[k] = [(stand_in(w, m), stand_in(g, m), _map(inner, functools.partial(stand_in, n=m)),
                           None if low is None else stand_in(low, m)) for m in stand_in_sizes(n)]
    return got[:n]


def _lazy_step(opt, w, rows, values, inner, s, seg=None, low=None):
    """One lazy update in place: the gradient's ``rows`` of the weight and of every state gathered, the lazy
    kernel on them with the gradient's ``values``, the rows written back (one loop when compiled; nothing of
    the table's size is allocated)."""
    new_w, new_s = type(opt).lazy_kernel(opt, w.index_select(0, rows), values.to(w.dtype),
                                         _sparse.gather(inner, rows), s, seg)
    _sparse.write_rows_(w, low, inner, new_w, new_s, rows)


def execute_rows(opt, w, rows, values, inner, s, low=None):
    """The lazy update of ``w``'s ``rows`` (unique, from a coalesced row-sparse gradient with ``values``) and
    of the same rows of its state ``inner``, with ``opt.lazy_kernel`` and ``lazy_prepare``'s scalars ``s``,
    compiled (the gather, kernel and scatter as one loop) where a compiler works, else eagerly."""
    leaves = _tree.leaves(inner)
    ts = _as_tensors(s, _scalar_dtype(w, leaves), w.device, _kept(opt, "_scalar_tensors", _SCALARS_KEPT))
    key = (type(opt), "lazy", w.dtype, w.device.type, w.dim(), _signature(inner), low is not None and low.dtype)
    with torch.no_grad():
        _run(True, key, opt, w, rows, values, inner, ts, None, low, step=_lazy_step)


def _write(dst, src):
    """``_tree.assign`` in a form dynamo traces (no identity tests on tuples)."""
    if isinstance(dst, torch.Tensor):
        dst.copy_(src)
    elif isinstance(dst, tuple):
        for d, x in zip(dst, src):
            _write(d, x)


class _NoOuterLoopFusion:
    """Compile without inductor's CPU outer-loop fusion, whose local-buffer codegen fails (KeyError, torch
    2.13) on a row reduction feeding two in-place outputs (LARS's weight and momentum); the fused step then
    runs as a row-reduction loop and an elementwise loop. Patched only while optzoo's own kernels run."""

    def __enter__(self):
        try:
            from torch._inductor.codegen.cpp import CppScheduling
        except Exception:  # pragma: no cover - another inductor layout: nothing to patch
            self.cls = None
            return self
        self.cls, self.old = CppScheduling, CppScheduling.__dict__.get("can_fuse_vertical_outer_loop")
        if self.old is not None:
            CppScheduling.can_fuse_vertical_outer_loop = lambda self, node1, node2: False
        return self

    def __exit__(self, *exc):
        if self.cls is not None and self.old is not None:
            self.cls.can_fuse_vertical_outer_loop = self.old


_COMPILED = {}  # key -> compiled step; None where compiling failed (eager from then on)


def _compiled(key, step=_fused_step):
    """The compiled ``step`` (:func:`_fused_step`, :func:`_group_step` or :func:`_lazy_step`) for ``key``
    (optimizer class, layout, dtypes, group length): a copy of it with a code object of its own, so each key has
    dynamo's own cache and recompile limit."""
    fn = _COMPILED.get(key)
    if fn is None:
        direct = step in _DIRECT_STEPS
        code = step.__code__.replace(co_name=f"_step_{len(_COMPILED)}")
        step = types.FunctionType(code, step.__globals__, code.co_name, step.__defaults__, step.__closure__)
        # emulate_precision_casts: round fp16/bf16 intermediates as eager torch does (bit-exact); only there:
        # with dynamic shapes it costs fp32 kernels ~1.8x (measured, Adam on one 16M tensor)
        options = {"emulate_precision_casts": True} if key[2] in (torch.float16, torch.bfloat16) else {}
        # one graph serves every size: without dynamic_threads inductor decides from the first call's size
        # whether the loop is parallel, and a graph first compiled on a small tensor stays one-threaded
        options["cpp.dynamic_threads"] = True
        if key[1] == "rows":  # packs' runs: recompute what both the row sums and the update read (LAMB's u) instead
            # of storing it, as a tensor-sized temporary costs its page faults on every step. Not for large tensors:
            # LAMB's run in two phases on the CPU (u stored in a kept buffer), and LARS's kernel, with these, ran
            # its update loop at ~1.3-1.7x torch fused Adam's time on one 16M tensor, ~1.15-1.2x without
            options.update(realize_reads_threshold=16, realize_opcount_threshold=200, realize_acc_reads_threshold=64)
        if getattr(key[0], "_kernel_noise", False):
            # counter-based noise (SGLD): each mixing step reads its value twice (z ^ (z >> s)), and inductor
            # generates a reused pointwise node's code again at every use, so the work doubled with each step: a
            # cold first call spent 23 s (one tensor per call) and 57 s (four) in inductor's Python. Reused nodes
            # of more than 40 ops are realized instead, then fused back into the one loop as locals (no memory
            # traffic, the same step time and bits). With 16, a weight in pairs (PAIRS) kept three loops and
            # tensor-sized buffers between them (its [blocks, 16] halves are not flattened as the realized nodes
            # are): 72.9 ms a step on one 16M tensor against 9.6 with 40, whose first call took 11.7 s against
            # 11.2 (element by element: 10.6 s with 16, 11.4 with 40; compiler start-up included, 2-core AMD
            # EPYC, an empty inductor cache)
            options["realize_opcount_threshold"] = 40
        # inductor, recording where each graph's inputs lie in a call's arguments: steady-state calls of the
        # elementwise steps then skip dynamo (_direct)
        backend = _direct.backend(options) if direct else None
        fn = _COMPILED[key] = torch.compile(step, dynamic=True, options=options) if backend is None else \
            torch.compile(step, dynamic=True, backend=backend)
    return fn


def _run(compiled, key, *args, step=_fused_step, stand_ins=None):
    """The ``step``, compiled if asked and possible, and what it returns; where compiling fails (no C compiler,
    an unsupported platform, a compiler bug) it warns once and that kernel runs eagerly from then on.
    ``stand_ins(args)``: arguments of distinct sizes for a group graph's first compile (as :func:`_distinct`)."""
    if not compiled or _COMPILED.get(key, True) is None:
        return step(*args)
    if args[0].clip_gradient:
        args[0]._clip_bounds()  # made here, read as constants by the compiled kernel
    try:
        first = key not in _COMPILED
        fn = _compiled(key, step)
        recorded = step in _DIRECT_STEPS  # its graphs recorded for direct calls (_direct)
        # called directly where it can be: not on the local shards of sharded parameters (their sums are collectives)
        at = _DIRECT_STEPS[step][0] if recorded else None
        direct = recorded and (at is None or args[at] is None or args[at] is WHOLE or args[at] is ROWS)
        if key[1] == "rows":
            with _NoOuterLoopFusion():
                return _direct.run(key, fn, args) if direct else fn(*args)
        if first and stand_ins is not None and len(args[1]) > 1:
            # compiled on members of distinct sizes: one graph for every size pattern
            if recorded:
                _direct.through(key, fn, stand_ins(args))
            else:
                fn(*stand_ins(args))
        return _direct.run(key, fn, args) if direct else fn(*args)
    except Exception as exc:  # compilation happens before the kernel writes anything
        _COMPILED[key] = None
        warnings.warn(f"optzoo: compiling the fused optimizer kernel failed ({type(exc).__name__}: "
                      f"{str(exc).splitlines()[0] if str(exc) else ''}); running the eager kernels instead",
                      RuntimeWarning, stacklevel=5)
        return step(*args)


def layout_of(opt, weight):
    """How ``opt``'s kernel runs over tensors like ``weight``: ``"elementwise"`` (states shaped like the
    weight), ``"norms"`` (elementwise states, per-tensor sums: rows of parameters), ``"rows"`` (2-D weights
    with a state per row, as GroupAdaGrad's), or None (no kernel: the reference path)."""
    if not opt._has_fast_path():
        return None
    cache = opt.__dict__.setdefault("_layouts", {})
    key = (weight.dtype, weight.dim() == 2, opt.multi_precision)
    if key not in cache:
        leaves = _tree.leaves(opt.create_state_multi_precision(0, torch.empty((2, 4), dtype=weight.dtype,
                                                                              device="meta")))
        if all(leaf.numel() == 8 for leaf in leaves):
            cache[key] = "norms" if opt._segment_kernel else "elementwise"
        elif key[1] and all(leaf.numel() == 8 or tuple(leaf.shape) == (2, 1) for leaf in leaves):
            cache[key] = "rows"
        else:
            cache[key] = None
    return cache[key]


def _flat(t):
    """A 1-D view of every element of ``t`` in memory order (dense tensors, channels_last included), or None."""
    if t.is_contiguous():
        return t.view(-1)
    order = sorted(range(t.dim()), key=lambda d: -t.stride(d))
    p = t.permute(order)
    return p.view(-1) if p.is_contiguous() else None


def _key(opt, layout, w, inner, s, low=None):
    # dynamo specializes sizes 0 and 1: a graph of their own, so that [1, n] runs do not use up the others'
    # recompile limit
    if isinstance(w, tuple):  # a weight's views in pairs (PAIRS)
        ones = tuple(tuple(d <= 1 for d in x.shape) for x in w)
        w, low = w[0], None if low is None else low[0]
    else:
        ones = tuple(d <= 1 for d in w.shape)
    return (type(opt), layout, w.dtype, w.device.type, _signature(inner), _scalar_kinds(s), ones,
            None if low is None else low.dtype)


#: Where :func:`_key` puts the scalars' part (:func:`_scalar_kinds`), which a :class:`~._large._LargePlan` makes
#: anew.
_KINDS = 5


def _scalar_kinds(s):
    """What a compiled graph is specialized on in a scalar tuple: each tensor's dim, -1 for a Python value."""
    return tuple(x.dim() if isinstance(x, torch.Tensor) else -1 for x in s)


def _signature(tree):
    """The state tree's nesting and leaf dtypes (what a compiled graph is specialized on, besides sizes)."""
    if isinstance(tree, torch.Tensor):
        return tree.dtype
    if tree is None:
        return None
    return tuple(_signature(t) for t in tree)


#: Distinct scalar tuples whose tensors an optimizer keeps (a schedule makes a new one every step; the oldest go).
_SCALARS_KEPT = 64


def _kept(opt, attr, limit):
    """A cache the optimizer keeps between steps (``opt.<attr>``, a dict), its oldest entries dropped beyond
    ``limit`` (entries are used in insertion order; a user moves one to the end to keep it)."""
    cache = opt.__dict__.setdefault(attr, {})
    while len(cache) > limit:
        cache.pop(next(iter(cache)))
    return cache


def _as_tensors(s, dtype, device, cache):
    """Kernel scalars as 0-d tensors (one compiled graph for every value), made once per distinct tuple: in
    fp32 for fp16/bf16 kernels (a 0-d tensor takes the dtype of the tensors it meets, as a Python scalar
    would not; held wider it keeps the values that fp32 arithmetic in the kernel reads). A new tuple (a
    schedule's, or Adam's bias-corrected lr at every step) makes tensors only for the values that changed in
    their places: the others are the previous tuples' (one ``torch.tensor`` instead of eight, ~40 us a step)."""
    key = (s, dtype, device)
    got = cache.get(key)
    if got is None:
        places = _places(cache)
        got = cache[key] = tuple(_placed_tensor(places, k, x, dtype, device) for k, x in enumerate(s))
    return got


#: The key, in an optimizer's scalar cache, of its per-place values (dropped with the oldest tuples, then remade).
_PLACES = object()


def _places(cache):
    """The per-place tensors of an optimizer's scalar cache: remade where values that change at every step (a
    schedule's, LAMB's bias corrections) have added a place each beyond a bound, not grown without one."""
    places = cache.get(_PLACES)
    if places is None or len(places) > 16 * _SCALARS_KEPT:
        places = cache[_PLACES] = {}
    return places


def _placed_tensor(places, k, x, dtype, device):
    """The 0-d tensor of value ``x`` in place ``k`` of a scalar tuple (kept per place: two places never share a
    tensor, which dynamo would take for aliased inputs)."""
    if isinstance(x, torch.Tensor):
        return x
    key = (k, type(x), x, dtype, device)
    got = places.get(key)
    if got is None:
        got = places[key] = _scalar_tensor(x, dtype, device)
    return got


def _scalar_tensor(x, dtype, device):
    """One kernel scalar as a 0-d tensor (tensors pass): a :class:`Key` as int64, a number in ``_wide(dtype)``."""
    if isinstance(x, torch.Tensor):
        return x
    return torch.tensor(x, dtype=torch.int64 if isinstance(x, Key) else _wide(dtype), device=device)


def _wide(dtype):
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _scalar_dtype(w, leaves):
    """Scalars are held in the widest dtype the kernel computes in (fp32 states with fp16 weights)."""
    dtype = w.dtype
    for x in leaves:
        if x.dtype is not dtype:
            dtype = torch.promote_types(dtype, x.dtype)
    return dtype


def execute(opt, fused, weights, grads, states, scalars, shards=None, lows=None):
    """Update ``weights`` (and ``states``) in place from ``grads`` with ``opt``'s kernel and the per-index
    ``scalars`` (``prepare``'s tuples, in the order of the weights; a stochastic rule's draws, made beforehand
    in index order, come last: a noise tensor or a :class:`Key` per index). ``shards``:
    per-index :class:`~optzoo.optimizer._numerics.Shards` (or None) for weights that are the local shards of
    sharded parameters: kernels with per-tensor sums then run tensor by tensor, in order (every process
    takes part in the same sums), with the whole parameter's sums. ``lows``: per-index fp16/bf16 weights that
    get a copy of their updated fp32 master (``weights``), or None."""
    lows = lows if lows is not None else [None] * len(weights)
    if shards is not None and any(sh is not None for sh in shards) and opt._segment_kernel:
        with torch.no_grad():
            for w, g, st, s, shard, low in zip(weights, grads, states, scalars, shards, lows):
                _fused_step(opt, w, g, st, s, shard, low)
        return
    numels = list(map(torch.Tensor.numel, weights))
    if not fused and _few_small(numels):
        with torch.no_grad():  # a few small tensors: the eager kernel on each (what packing would cost more than)
            for w, g, st, s, low in zip(weights, grads, states, scalars, lows):
                _fused_step(opt, w, g, st, s, None, low)
        return
    # each weight's pack: (dtype, device, layout); with C-level maps, as there may be thousands of weights
    kinds = list(zip(map(_DTYPE, weights), map(_DEVICE, weights), map(torch.Tensor.dim, weights)))
    layouts = {kind: layout_of(opt, weights[kinds.index(kind)]) for kind in set(kinds)}
    cache = _kept(opt, "_scalar_tensors", _SCALARS_KEPT)
    targets = {(dtype, device, lay) for (dtype, device, _), lay in layouts.items()}
    if len(targets) == 1 and max(numels) < LARGE and (len(weights) > 1 or fused):
        # one pack of every weight (the common case of many small ones): no per-weight grouping
        with torch.no_grad():
            _packs._run_pack(opt, fused, next(iter(targets))[2], weights, grads, states, scalars, cache, lows)
        return
    with torch.no_grad():
        large = [k for k, n in enumerate(numels) if n >= LARGE]
        args = (kinds, layouts, weights, grads, states, scalars, cache, lows)
        # the small tensors first (as run_plan, for the same reason), then the large ones in place; a large one
        # with no flat form (a transposed view) is packed after them
        _run_packs(opt, fused, [k for k, n in enumerate(numels) if n < LARGE], *args, twin=bool(large))
        placed = _large.run(opt, layouts, kinds, large, weights, grads, states, scalars, cache, lows)
        _run_packs(opt, fused, [k for k in large if k not in placed], *args)


def _few_small(numels):
    """Whether tensors of these sizes are a few small ones and nothing else, which run each on its eager kernel
    unless fused (:func:`execute`, and :class:`Plan` after it): what packing them would cost more than."""
    return len(numels) < PACK_MIN and all(n < LARGE for n in numels)


def _run_packs(opt, fused, indices, kinds, layouts, weights, grads, states, scalars, cache, lows, twin=False):
    """The tensors at ``indices`` packed by dtype, device and layout (a lone one eagerly, unless ``fused``);
    ``twin``: as :func:`~._packs._run_pack`'s."""
    packs = {}
    for k in indices:
        dtype, device, _ = kinds[k]
        packs.setdefault((dtype, device, layouts[kinds[k]]), []).append(k)
    for (_, _, lay), members in packs.items():
        if len(members) == 1 and not fused:
            k = members[0]
            _fused_step(opt, weights[k], grads[k], states[k], scalars[k], None, lows[k])
            continue
        ws = [weights[k] for k in members]
        _packs._run_pack(opt, fused, lay, ws, [grads[k] for k in members], [states[k] for k in members],
                         [scalars[k] for k in members], cache, [lows[k] for k in members], _pack(opt, lay, ws),
                         twin=twin)


#: Packs (by layout, dtype, device and shapes) an optimizer keeps for :func:`execute` (the least recently used
#: beyond are dropped).
_PACKS_KEPT = 4


def _pack(opt, layout, weights):
    """The :class:`Pack` of tensors of these shapes, kept by the optimizer between calls (the MXNet-style
    ``update``'s, the Trainer's; the torch face keeps its own in a :class:`Plan`)."""
    w0 = weights[0]
    key = (layout, w0.dtype, w0.device, tuple(map(_SHAPE, weights)))
    got = opt.__dict__.get("_packs", {}).pop(key, None)
    if got is None:
        got = Pack(opt, layout, weights)
    _kept(opt, "_packs", _PACKS_KEPT - 1)[key] = got  # most recently used last
    return got


def _run_groups(opt, key, members, tape=None):
    """Large tensors of one graph key, in place, up to :data:`GROUP` per compiled call (one parallel region
    with a loop per tensor): each call of a compiled step costs tens of microseconds of dynamo's and AOT's
    wrappers, which ResNet-50's 42 large tensors paid one by one. Groups of :data:`GROUP` members, a last, shorter
    group filled up with stand-ins: one graph per key (a graph for the rest would cost its compile time cold and
    its tracing warm, at the first step); a lone large tensor runs alone, on a graph of its own, and so does, on
    the CPU, a member of :data:`ALONE` elements or more of a rule with per-tensor sums. ``tape``: a list that
    gets each compiled call's ``(key, step, args)``."""
    seg = key[-1]
    key = key[:-1]
    if key[1] == "norms" and key[3] == "cpu" and len(members) > 1:  # the large ones alone (see ALONE)
        alone = [m for m in members if m[0].numel() >= ALONE]
        if alone:
            rest = [m for m in members if m[0].numel() < ALONE]
            if rest:
                _run_groups(opt, key + (seg,), rest, tape)
            for member in alone:
                _run_groups(opt, key + (seg,), [member], tape)
            return
    if _phases.wanted(opt, key):  # two compiled loops, the direction stored between them (LAMB on the CPU)
        _phases.run(opt, key, seg, members, GROUP, tape)
        return
    whole = len(members) - len(members) % GROUP
    if key[1] == "rows" or any(x.dim() for x in members[0][3]) or isinstance(members[0][0], tuple):
        # one by one: per-row states (2-D, see _NoOuterLoopFusion), per-element scalars (a replaced noise), PAIRS
        whole = 0
    elif len(members) > 1 and whole < len(members):
        # the last, shorter chunk filled up with small stand-ins (as the two-phase rules' chunks): the group graph is
        # the key's only graph, where one for the rest would cost its compile (cold) and its tracing (warm) at the
        # first step; the stand-ins' loops cost microseconds. A lone member runs alone (one 16M tensor: no barrier
        # per stand-in's loop, which a busy machine makes wait)
        n = GROUP - len(members) % GROUP
        members = members + [(w, g, inner, ts, low) for (w, g, inner, low), ts in
                             zip(padding(opt, key, members[0], n), _padding_scalars(members, n))]
        whole = len(members)
    for start in range(0, whole, GROUP):
        ws, gs, inners, tss, flows = map(list, zip(*members[start:start + GROUP]))
        shared = all(map(operator.is_, tss, itertools.repeat(tss[0])))  # prepare's one tuple (the common case)
        args = (opt, ws, gs, inners, tss[0] if shared else tss, seg, flows if flows[0] is not None else None)
        _run(True, key + ("group", GROUP, shared), *args, step=_group_step, stand_ins=_distinct)
        if tape is not None:
            tape.append((key + ("group", GROUP, shared), _group_step, args))
    for fw, fg, finner, ts, flow in members[whole:]:
        args = (opt, fw, fg, finner, ts, seg, flow)
        _run(True, key, *args)
        if tape is not None:
            tape.append((key, _fused_step, args))


def _padding_scalars(members, n):
    """Scalars for ``n`` stand-ins after ``members``: prepare's one tuple where every member has it (the common
    case); else the last member's, with a copy of its own of each scalar tensor that not every member shares (a
    noise key): the dynamo graph of a group sees the same pattern of shared inputs as in a group of real members,
    where one tuple for all would make another graph, and one tensor twice a recompile."""
    ref = members[-1][3]
    if all(map(operator.is_, map(operator.itemgetter(3), members), itertools.repeat(ref))):
        return [ref] * n
    own = [not all(m[3][k] is x for m in members) for k, x in enumerate(ref)]
    return [tuple(x.clone() if mine and isinstance(x, torch.Tensor) else x for x, mine in zip(ref, own))
            for _ in range(n)]


def _view_1d(t):
    return t.view(-1)


def _map(tree, fn):
    if tree is None:
        return None
    if isinstance(tree, torch.Tensor):
        return fn(tree)
    return tuple(_map(t, fn) for t in tree)


class Plan:
    """:func:`execute`'s sorting of a list of tensors, done once for as long as their dtypes, shapes and device
    stay (the torch face keeps one per param group, :meth:`OptzooOptimizer._lane`): which are large (updated in
    place, :func:`._large.run`) and the :class:`Pack` of the small ones. One dtype, device and layout."""

    __slots__ = ("layout", "large", "small", "few", "pick", "pack", "kinds", "layouts", "no_lows")

    def __init__(self, opt, layout, weights):
        numels = list(map(torch.Tensor.numel, weights))
        self.layout = layout
        self.large = [k for k, n in enumerate(numels) if n >= LARGE]
        self.small = [k for k, n in enumerate(numels) if n < LARGE]
        # a few small tensors and nothing else: each on its eager kernel unless fused, as execute runs them (a
        # later step then computes what the first computed: the same bits where a kernel sums); an elementwise
        # kernel's of PACK_COMPILED elements or more are updated in place by its compiled kernel, as large ones
        # (the eager kernel's bits: no sums), instead of a dozen eager ops per step
        self.few = _few_small(numels)
        if self.few and layout == "elementwise":
            self.large = [k for k, n in enumerate(numels) if n >= PACK_COMPILED]
            self.small = [k for k, n in enumerate(numels) if n < PACK_COMPILED]
        self.pick = operator.itemgetter(*self.small) if len(self.small) > 1 else None
        self.pack = None if self.pick is None else Pack(opt, layout, list(self.pick(weights)))
        self.kinds = list(zip(map(_DTYPE, weights), map(_DEVICE, weights), map(torch.Tensor.dim, weights)))
        self.layouts = dict.fromkeys(self.kinds, layout)
        self.no_lows = [None] * len(weights)


def run_plan(opt, fused, plan, weights, grads, states, scalars):
    """One :class:`Plan`'s step (the caller checked that the tensors are still the plan's dtypes, shapes and
    device, dense, with their states made): :func:`execute` without its per-tensor sorting. The small tensors
    first: the pack's Python then runs before the large tensors' kernels have streamed its objects out of the
    CPU's caches (measured 0.94-0.97x the step time of the large ones first on ResNet-50's shapes, by an A/B run
    whose base took no direct calls: ``docs/fast-path.md``'s correction; not re-measured alone)."""
    with torch.no_grad():
        cache = _kept(opt, "_scalar_tensors", _SCALARS_KEPT)
        args = (plan.kinds, plan.layouts, weights, grads, states, scalars, cache, plan.no_lows)
        if plan.few and not fused:
            for k in plan.small:
                _fused_step(opt, weights[k], grads[k], states[k], scalars[k], None)
        elif plan.pack is not None:
            pick = plan.pick
            _packs._run_pack(opt, fused, plan.layout, *(list(pick(x)) for x in (weights, grads, states, scalars)),
                             cache, None, plan.pack, twin=bool(plan.large))
        elif plan.small:  # one small tensor: as execute runs it
            _run_packs(opt, fused, plan.small, *args)
        if plan.large:
            # detached, as the general path passes them: the parameters themselves made dynamo's tracing refuse a
            # view made under no_grad after a parameter was re-bound (``p.data = ...``; tests/test_face_lane.py)
            weights = list(weights)
            for k in plan.large:
                weights[k] = _DETACH(weights[k])
            placed = _large.run(opt, plan.layouts, plan.kinds, plan.large, weights, grads, states, scalars, cache,
                                plan.no_lows)
            # a large weight with no flat form now (re-bound to a transposed view): packed, as execute does
            _run_packs(opt, fused, [k for k in plan.large if k not in placed], plan.kinds, plan.layouts, weights,
                       grads, states, scalars, cache, plan.no_lows)


_DETACH = torch.Tensor.detach  # (``Parameter.detach`` would go through ``__torch_function__``)


