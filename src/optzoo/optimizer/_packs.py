"""Packs: the executor's form for small tensors (fewer than :data:`~.engine.LARGE` elements) of one dtype, device
and state layout.

The weights and gradients are copied into scratch buffers kept between steps (unless they already lie end to
end in one buffer: :func:`~optzoo.torch.flatten_parameters`), their states are made end to end in one buffer
(:func:`adjacent`) and used in place, and one kernel call updates them all; the weights are copied back.
Per-parameter scalars are spread per element; per-tensor norms and per-row states run run by run over
``[rows, cols]`` views of equal-sized parameters (:class:`Segments`), such packs sorted by size
(:func:`pack_order`). A :class:`Pack` keeps what a pack of one pattern of shapes needs from step to step.
"""
from __future__ import annotations

import itertools
import operator

import torch

from . import _direct, _tree
from . import engine as _engine
from ._numerics import ROWS, Key


#: Fewer small tensors than this are updated one by one, eagerly (a pack's copies cost more).
PACK_MIN = 4
#: A pack of at most this many runs of equal-sized parameters runs run by run (``[k, n]`` views, per-parameter
#: scalars as ``[k, 1]`` columns) where an elementwise kernel has per-parameter scalars; more are spread per element.
RUNS_AS_ROWS = 8
#: A pack this large (elements) runs compiled: one parallel loop instead of one parallel region per eager op,
#: each a barrier that waits for a descheduled thread when the machine is shared.
PACK_COMPILED = 1 << 12


class Segments:
    """Where each parameter lies in a flat pack, for per-parameter scalars and per-tensor reductions.

    ``runs`` are the maximal stretches of consecutive parameters of one size, ``(first, stop, offset, rows,
    cols, row_offset)``: a ``[rows, cols]`` matrix of the pack whose rows are the parameters (per-tensor
    sums are row sums). With ``row_counts`` (2-D parameters whose optimizer keeps a state per row, as
    GroupAdaGrad) a run is instead the consecutive parameters of one column count, their rows stacked, and
    ``row_offset`` locates it in the per-row states.
    """

    def __init__(self, sizes, device, row_counts=None):
        self.sizes = list(sizes)
        self.device = device
        self.offsets = list(itertools.accumulate(self.sizes, initial=0))
        self.total = self.offsets[-1]
        self.row_counts = list(row_counts) if row_counts is not None else None
        rows = self.row_counts or [1] * len(self.sizes)
        cols = [n // r if r else 0 for n, r in zip(self.sizes, rows)] if row_counts is not None else self.sizes
        self.total_rows = sum(rows)
        self.runs = []
        k, row = 0, 0
        for size, run in itertools.groupby(cols):  # runs of equal column counts, found in C
            stop = k + len(list(run))
            nrows = sum(rows[k:stop]) if row_counts is not None else stop - k
            self.runs.append((k, stop, self.offsets[k], nrows, size, row))
            k, row = stop, row + nrows

    @classmethod
    def of(cls, layout, weights):
        """The segments of a ``layout`` pack of ``weights`` (per-row states: ``"rows"``, the weights' row counts)."""
        rows = [w.shape[0] for w in weights] if layout == "rows" else None
        return cls(list(map(torch.Tensor.numel, weights)), weights[0].device, rows)

    def spread(self, values, dtype):
        """Per-segment values as a per-element tensor (written run by run: no per-element index), in ``dtype``
        or, where a value would round in it, wider (:func:`column`)."""
        v = column(values, dtype, self.device)
        out = torch.empty(self.total, dtype=v.dtype, device=self.device)
        for first, stop, offset, rows, cols, _ in self.runs:
            out[offset:offset + rows * cols].view(rows, cols).copy_(self.per_row(v, first, stop))
        return out

    def per_row(self, column, first, stop):
        """Rows ``first:stop`` of a per-parameter ``[n]`` or ``[n, 1]`` column as the run's ``[rows, 1]``."""
        part = column[first:stop].reshape(-1, 1)
        if self.row_counts is None:
            return part
        counts = torch.tensor(self.row_counts[first:stop], device=part.device)
        return torch.repeat_interleave(part, counts, dim=0, output_size=sum(self.row_counts[first:stop]))


def column(values, dtype, device):
    """A per-parameter scalar column (spread per element, or ``[k, 1]``) of a pack whose scalars are held in
    ``dtype``, as a 1-D tensor: in ``dtype`` itself where every value is one of its numbers, else in fp32 for
    fp16/bf16. A
    column is a tensor of the pack's shape, which takes part in type promotion: in the weight dtype it keeps the
    kernel's arithmetic there (as the reference path's Python floats do), but a value that would round in fp16 or
    bf16 (a scalar held in fp32: Nadam's schedule, Signum's ``1 - mu``) must keep its fp32 value, as the
    reference path's does; the kernels that hold such scalars compute in fp32 (or through
    :func:`~._numerics.wide_mul`), where an fp32 column changes nothing else."""
    wide = _engine._wide(dtype)
    if wide is dtype:
        return torch.tensor(values, dtype=dtype, device=device)
    exact = torch.tensor(values, dtype=torch.float64)
    narrow = exact.to(dtype)
    return (narrow if torch.equal(narrow.to(torch.float64), exact) else exact.to(wide)).to(device)


def _run_key(layout, w):
    """What a run of a ``layout`` pack shares: the size (``"norms"``) or the column count (``"rows"``)."""
    return w.numel() if layout == "norms" else w.numel() // w.shape[0] if w.shape[0] else 0


def pack_order(layout, weights):
    """The order a pack of ``weights`` lays them in: None (as given) for elementwise rules, else (per-tensor
    sums: ``"norms"``, ``"rows"``) the positions sorted by run key (stable), so that equal sizes form one run of
    :class:`Segments`, whatever order the model holds them in: a kernel call per run (ResNet-50's 119 small
    tensors: 50 runs as given, 12 sorted). None also where they are already sorted, or lie end to end in one
    buffer (``flatten_parameters``: used in place rather than copied in another order)."""
    if layout not in ("norms", "rows") or len(weights) < 2:
        return None
    keys = [_run_key(layout, w) for w in weights]
    order = sorted(range(len(keys)), key=keys.__getitem__)
    if order == list(range(len(keys))) or _joined(weights) is not None:
        return None
    return order


def _ordered(order, *lists):
    """Each of ``lists`` (or None) in ``order``."""
    get = operator.itemgetter(*order)
    return tuple(None if x is None else list(get(x)) for x in lists)


def _columns(per):
    """Per-index tuples as columns: a column's single value where it agrees across the indices, else the
    list of values (always for tensors and noise keys, which belong to their index)."""
    first = per[0]
    if all(map(operator.is_, per, itertools.repeat(first))):  # prepare's one tuple for every index (the common case)
        return list(first)
    cols = []
    for col in zip(*per):
        first = col[0]
        if isinstance(first, (torch.Tensor, Key)):
            cols.append(list(col))
        else:  # tuple.count compares in C (identity first, then ==): ~20x a generator's comparisons
            cols.append(first if col.count(first) == len(col) else list(col))
    return cols


def _per_element(col, segs):
    """A pack's column of per-index drawn noise as one per-element tensor: the tensors end to end, or, for
    keys, ``key - offset`` per element (the kernel adds the element's place in the pack); other columns pass."""
    if isinstance(col, list) and isinstance(col[0], torch.Tensor):
        return torch.cat([x.reshape(-1) for x in col])
    if isinstance(col, list) and isinstance(col[0], Key):
        return segs.spread([k - o for k, o in zip(col, segs.offsets)], torch.int64)
    return col


class Pack:
    """What a pack of small tensors of one dtype, device and layout needs beyond its tensors, for as long as
    their shapes stay (a :class:`Plan` keeps one for its small tensors): where each
    lies (:class:`Segments`), its scratch buffers, and the last step's one-buffer views of weights and
    gradients that lay end to end (``flatten_parameters``), found again by their addresses alone (~0.15 ms
    instead of ~0.85 ms of :func:`_joined`'s checks for 2,000 tensors)."""

    def __init__(self, opt, layout, weights):
        self.layout = layout
        self.order = pack_order(layout, weights)
        if self.order is not None:
            weights, = _ordered(self.order, weights)
        self.segs = Segments.of(layout, weights)
        self.scratch = None  # made at the first step that copies (never, where everything lies in one buffer)
        self.joins = [None, None]  # (data_ptrs, view) of the weights', the gradients' last join
        self.call = None  # (replay, weight, gradient, state leaves) of the last compiled call (:meth:`replayed`)

    def replayed(self, opt, w, g, inner, s):
        """The pack's compiled call made again as the last step made it (:class:`~._direct.Replay`: its inputs
        computed once, only the scalars' tensors ``s`` put in their places and checked), where the flat weight,
        gradient and states are the same objects (the scratch buffers, the joined views and states kept between
        steps): True where it ran; else nothing ran and the caller makes the call."""
        got = self.call
        if got is None:
            return False
        rep, fw, fg, leaves = got
        if fw is not w or fg is not g or not _same_objects(_tree.leaves(inner), leaves):
            return False
        if opt.clip_gradient:
            opt._clip_bounds()  # (as _engine._run makes them: read as constants by the kernel)
        args = rep.inputs(opt, list(s))
        if args is not None and rep.run(opt, args):
            return True
        self.call = None
        return False

    def record(self, opt, key, w, g, inner, s):
        """The compiled call just made (graph ``key``) kept for :meth:`replayed`, where it was called directly."""
        rep = _direct.Replay.make(key, (opt, w, g, inner, s, None, None), list(s))
        self.call = None if rep is None else (rep, w, g, _tree.leaves(inner))

    def joined(self, slot, tensors):
        """:func:`_joined` of ``tensors`` (``slot`` 0: the weights, 1: the gradients), taken from the last step
        where the tensors are at the same addresses, contiguous (the shapes and dtype are the pack's: the
        caller checked them; the kept view keeps that memory from being anyone else's)."""
        got = self.joins[slot]
        if got is not None:
            ptrs = list(map(torch.Tensor.data_ptr, tensors))
            if ptrs == got[0] and all(map(torch.Tensor.is_contiguous, tensors)):
                return got[1]
        flat = _joined(tensors)
        self.joins[slot] = None if flat is None else (list(map(torch.Tensor.data_ptr, tensors)), flat)
        return flat


def _run_pack(opt, fused, layout, weights, grads, states, scalars, cache, lows, pack=None, twin=False):
    """Small tensors packed, one kernel call over them. Tensors that already lie end to end in one buffer
    (states made by :func:`adjacent`, multi-precision master copies among them) are used in place; the
    others (the user's weights and gradients) are copied into scratch buffers and the weights copied back.
    ``pack``: a :class:`Pack` of these tensors' shapes (else its parts are found here). ``twin``: large tensors of
    the same call (whose compiled graph an elementwise pack too small to compile may take, :func:`_twin_compiled`).
    Runs in
    :func:`pack_order`: the weights are copied back and the states written to their own tensors whatever
    the order."""
    if opt._kernel_noise and not all(map(torch.Tensor.is_contiguous, weights)):
        # counter-based noise goes by each element's place in memory (SGLD): a weight whose memory order is not
        # its logical one (transposed, channels_last) runs on its own kernel, which counts places in memory
        # (a pack's copy of it would count them in the logical order)
        for k, w in enumerate(weights):
            if not w.is_contiguous():
                _engine._fused_step(opt, w, grads[k], states[k], scalars[k], None, None if lows is None else lows[k])
        rest = [k for k, w in enumerate(weights) if w.is_contiguous()]
        if rest:
            pick = (lambda xs: [xs[k] for k in rest])
            _run_pack(opt, fused, layout, pick(weights), pick(grads), pick(states), pick(scalars), cache,
                      None if lows is None else pick(lows), twin=twin)
        return
    order = pack_order(layout, weights) if pack is None else pack.order
    if order is not None:
        weights, grads, states, scalars, lows = _ordered(order, weights, grads, states, scalars, lows)
    if pack is None:
        segs = Segments.of(layout, weights)
        w, g = _joined(weights), _joined(grads)
    else:
        segs = pack.segs
        w, g = pack.joined(0, weights), pack.joined(1, grads)
    copied_w = w is None
    if copied_w or g is None:
        if pack is None:
            w_buf, views, g_buf, g_views, flat = _scratch(opt, weights)
        else:
            if pack.scratch is None:
                pack.scratch = _scratch(opt, weights)
            w_buf, views, g_buf, g_views, flat = pack.scratch
        if copied_w:
            w = w_buf
            _copy_in(w_buf, views, weights, flat)
        if g is None:
            if grads[0].dtype == w_buf.dtype:
                g = g_buf
                _copy_in(g_buf, g_views, grads, flat)
            else:  # fp16/bf16 gradients of fp32 master copies
                g = _flatten(grads)
    g = g.to(w.dtype)
    inner, copied = _joined_tree(states, opt.__dict__.setdefault("_joined_states", {}))
    sdt = _engine._scalar_dtype(w, _tree.leaves(inner))
    cols = _columns(scalars)
    compiled = bool(fused) or segs.total >= PACK_COMPILED
    if layout in ("norms", "rows"):
        _run_runs(opt, compiled, layout, segs, w, g, inner, cols, sdt, cache)
    elif compiled and len(segs.runs) <= RUNS_AS_ROWS and \
            any(isinstance(c, list) and not isinstance(c[0], torch.Tensor) for c in cols):
        # per-index scalars (Nadam's schedule, SGLD's keys) of a few runs of equal-sized parameters: [k, 1]
        # columns over [k, n] views, where spreading them costs a per-element tensor written and read per scalar.
        # Eager, one call over the pack with its scalars spread: each run's call would repeat every op of the
        # kernel (SGLD's noise: ~40 ops, each ~3 us on a few hundred elements)
        _run_runs(opt, compiled, layout, segs, w, g, inner, cols, sdt, cache)
    else:
        cols = [_per_element(c, segs) for c in cols]
        s = tuple(segs.spread(c, sdt) if isinstance(c, list) else c for c in cols)
        if twin and not compiled and fused is None and w.numel() > 1 and _twin_compiled(opt, layout, w, inner, s):
            compiled = True  # the graph a large tensor's call compiled: the eager kernel's bits in one call
        if compiled:
            s = _engine._as_tensors(s, sdt, w.device, cache) if not any(isinstance(x, torch.Tensor) for x in s) else \
                tuple(_engine._scalar_tensor(x, sdt, w.device) for x in s)
        if not (compiled and pack is not None and pack.replayed(opt, w, g, inner, s)):
            # (the arguments of a lone large tensor's call, whose graph key this is too: a key keeps one direct-call
            # record (_direct), which calls of two arities would displace at every step, each then through dynamo)
            key = _engine._key(opt, layout, w, inner, s)
            _engine._run(compiled, key, opt, w, g, inner, s, None, None)
            if compiled and pack is not None:
                pack.record(opt, key, w, g, inner, s)
    sizes = segs.sizes
    if copied_w:
        torch._foreach_copy_(weights, views)
    if copied:
        _split_into(inner, states, sizes, segs)
    pairs = [(low, k) for k, low in enumerate(lows) if low is not None] if lows is not None else None
    if pairs:  # fp16/bf16 weights get their master copies, rounded
        parts = views if copied_w else _unflatten(w, weights)
        torch._foreach_copy_([low for low, _ in pairs], [parts[k] for _, k in pairs])


def _same_objects(xs, ys):
    return len(xs) == len(ys) and all(map(operator.is_, xs, ys))


def _twin_compiled(opt, layout, w, inner, s):
    """Whether the compiled graph of an elementwise pack's call (``w`` flat, its scalars ``s`` as they would be
    made 0-d tensors) exists, compiled by a large tensor's call of the same key (one large weight beside its
    biases): a pack under :data:`PACK_COMPILED` elements then takes it too, one call instead of a dozen eager ops,
    at no compile cost. Elementwise kernels only: compiled they give the eager kernel's bits, so whichever of the
    two a step takes (its first, before the large tensor's call compiled the graph) the numbers are the same."""
    if layout != "elementwise":
        return False
    key = _engine._key(opt, layout, w, inner, ())
    kinds = tuple(x.dim() if isinstance(x, torch.Tensor) else 0 for x in s)
    return bool(_engine._COMPILED.get(key[:_engine._KINDS] + (kinds,) + key[_engine._KINDS + 1:]))


#: Packs whose scratch buffers an optimizer keeps (the least recently used beyond are dropped).
_SCRATCH_KEPT = 4


def _scratch(opt, weights):
    """Scratch buffers for a pack of ``weights`` (weight and gradient, 1-D, the weights' dtype), each with its
    views shaped like the weights, kept between steps: a buffer allocated afresh at every step costs its page
    faults, and 2,000 views cost more than the copies into them."""
    cache = opt.__dict__.setdefault("_scratch", {})
    w0 = weights[0]
    key = (w0.dtype, w0.device, tuple(map(_SHAPE, weights)))
    got = cache.pop(key, None)
    if got is None:
        total = sum(t.numel() for t in weights)
        w_buf, g_buf = (torch.empty(total, dtype=w0.dtype, device=w0.device) for _ in range(2))
        flat = all(len(shape) == 1 for shape in key[2])
        got = (w_buf, _unflatten(w_buf, weights), g_buf, _unflatten(g_buf, weights), flat)
    _engine._kept(opt, "_scratch", _SCRATCH_KEPT - 1)[key] = got  # most recently used last
    return got


def _copy_in(buf, views, tensors, flat):
    """``tensors`` copied into ``buf`` (through its ``views``, shaped like them). 1-D tensors (``flat``: biases,
    norms' scales) go in by one ``torch.cat`` into the buffer, which copies in one C++ loop: ~2x faster than
    ``_foreach_copy_``'s copy per tensor on 2,000 tensors of 1K (one thread: 1.0 against 1.8-2.1 ms)."""
    if flat and buf.device.type == "cpu":
        torch.cat(tensors, out=buf)
    else:
        torch._foreach_copy_(views, tensors)


def _joined(tensors):
    """One 1-D view of tensors that lie end to end, in order, in one buffer; else None. Views of one base
    (states made by :func:`adjacent`) or tensors of one storage (parameters re-bound by
    :func:`optzoo.torch.flatten_parameters`: their ``_base`` is None). C-level maps, no Python loop body per
    tensor: ~0.3 ms for 2,000 tensors."""
    first, last = tensors[0], tensors[-1]
    base = first._base
    if base is not None:
        if not base.is_contiguous() or first.dtype != base.dtype or \
                not all(map(operator.is_, map(_BASE, tensors), itertools.repeat(base))):
            return None
    elif last.untyped_storage().data_ptr() != first.untyped_storage().data_ptr() or \
            not all(map(operator.is_, map(_DTYPE, tensors), itertools.repeat(first.dtype))):
        return None  # not one storage (or not one dtype)
    if not all(map(torch.Tensor.is_contiguous, tensors)):
        return None
    ends = list(itertools.accumulate(map(torch.Tensor.numel, tensors), initial=first.storage_offset()))
    if base is not None:
        if list(map(torch.Tensor.storage_offset, tensors)) != ends[:-1]:
            return None
        origin = base.storage_offset()
        return base.view(-1)[ends[0] - origin:ends[-1] - origin]
    # one storage: the first and last tensors share it, the others must lie end to end between them in memory
    size, start = first.element_size(), first.data_ptr()
    if list(map(torch.Tensor.data_ptr, tensors)) != [start + (e - ends[0]) * size for e in ends[:-1]]:
        return None
    return first.new_empty(0).set_(first.untyped_storage(), ends[0], (ends[-1] - ends[0],))


_BASE = operator.attrgetter("_base")
_SHAPE = operator.attrgetter("shape")
_DTYPE = operator.attrgetter("dtype")
_DEVICE = operator.attrgetter("device")


def _joined_tree(states, cache, path=()):
    """The states' leaves position by position, each :func:`_joined` or concatenated; whether any was copied.
    ``cache``: the optimizer's :func:`_joined_states` entries (one per leaf position, dtype and device)."""
    first = states[0]
    if first is None:
        return None, False
    if isinstance(first, torch.Tensor):
        flat = _joined_states(states, cache, path)
        return (_flatten(states), True) if flat is None else (flat, False)
    parts = [_joined_tree([st[k] for st in states], cache, path + (k,)) for k in range(len(first))]
    return tuple(p for p, _ in parts), any(c for _, c in parts)


def _joined_states(tensors, cache, path):
    """:func:`_joined` of a pack's states, remembered between steps: the same tensor objects at the same
    addresses with the same sizes lie as they lay (views of one base never change base; a state re-pointed
    by ``set_`` or ``.data =`` shows in its address or size). Checking that costs ~0.2 ms for 2,000
    tensors against ~1.4 ms for :func:`_joined`'s checks. One entry per leaf position, dtype and device:
    states replaced (``load_state_dict``) replace it, so no old buffer is kept alive."""
    first = tensors[0]
    key = (path, first.dtype, first.device)
    ptrs = list(map(torch.Tensor.data_ptr, tensors))
    numels = list(map(torch.Tensor.numel, tensors))
    got = cache.get(key)
    if got is not None and _same_objects(got[0], tensors) and got[1] == ptrs and got[2] == numels:
        return got[3]
    flat = _joined(tensors)
    if flat is None:
        cache.pop(key, None)
    else:
        cache[key] = (list(tensors), ptrs, numels, flat)
    return flat


def _flatten(tensors):
    """The tensors' elements end to end in a new 1-D tensor (one C++ call; contiguous copies of strided ones)."""
    return torch._C._nn.flatten_dense_tensors(tensors)


def _unflatten(flat, like):
    """Views of ``flat`` shaped like ``like``, for :func:`_flatten`'s inverse copy."""
    return torch._C._nn.unflatten_dense_tensors(flat, like)


def run_keys(opt, weights):
    """Per weight, what :func:`pack_order` sorts its pack by (None for a large weight), for :func:`adjacent`;
    None where no pack of these weights is sorted (elementwise rules; small weights in one buffer already)."""
    layouts = [_engine.layout_of(opt, w) for w in weights]
    if not {"norms", "rows"} & set(layouts):
        return None
    small = [w for w in weights if w.numel() < _engine.LARGE]
    if len(small) > 1 and _joined(small) is not None:
        return None
    return [_run_key(lay, w) if lay in ("norms", "rows") and w.numel() < _engine.LARGE else None
            for lay, w in zip(layouts, weights)]


def adjacent(trees, keys=None):
    """New state trees whose small tensors lie end to end in one buffer per leaf position and dtype (so that
    :func:`_run_pack` uses them in place); large ones are kept as they are. Called on states just made.
    ``keys``: :func:`run_keys` of their weights, the order to lay them in (the packs' :func:`pack_order`;
    None-keyed ones last)."""
    leaves = [_tree.leaves(t) for t in trees]
    if not leaves or not leaves[0]:
        return trees
    out = [list(ls) for ls in leaves]
    for k in range(len(leaves[0])):
        groups = {}
        for m, ls in enumerate(leaves):
            if k < len(ls) and ls[k].numel() < _engine.LARGE and ls[k].is_contiguous():
                groups.setdefault((ls[k].dtype, ls[k].device), []).append(m)
        for members in groups.values():
            if len(members) < 2:
                continue
            if keys is not None:
                members.sort(key=lambda m: (keys[m] is None, keys[m] or 0))
            flat = _flatten([leaves[m][k] for m in members])
            offset = 0
            for m in members:
                old = leaves[m][k]
                n = old.numel()
                out[m][k] = flat[offset:offset + n].view(old.shape)
                owner = getattr(old, _tree._OWNER, None)  # the mark of the optimizer that made the state
                if owner is not None:
                    setattr(out[m][k], _tree._OWNER, owner)
                offset += n
    # each tree with its tensors replaced, depth first, by its new leaves
    return [_engine._map(t, lambda _, new=iter(ls): next(new)) for t, ls in zip(trees, out)]


def _run_runs(opt, compiled, layout, segs, w, g, inner, cols, sdt, cache):
    """A kernel run by run: ``[rows, n]`` views whose rows are the parameters (or, with per-row states, their
    rows), per-parameter scalars as ``[rows, 1]`` columns. Kernels with per-tensor (per-row) reductions take
    their sums as row sums; elementwise ones (``layout`` ``"elementwise"``) run so where per-parameter scalars
    would otherwise be spread per element. A column of noise keys holds ``key - offset`` (the parameter's place
    in the pack), to which each run adds its own offset: the kernel adds the element's place in the run."""
    device = w.device
    keys = [isinstance(c, list) and isinstance(c[0], Key) for c in cols]
    cols = [torch.tensor([k - o for k, o in zip(c, segs.offsets)], dtype=torch.int64, device=device).view(-1, 1)
            if key else _per_element(c, segs) if isinstance(c, list) and isinstance(c[0], torch.Tensor)
            else column(c, sdt, device).view(-1, 1) if isinstance(c, list) else c for c, key in zip(cols, keys)]
    kind = "elementwise" if layout == "elementwise" else "rows"
    if compiled:  # the shared scalars' tensors, made once (not per run: LAMB on ResNet-50's ~50 runs made 600 a step)
        places = _engine._places(cache)
        cols = [c if isinstance(c, torch.Tensor) else _engine._placed_tensor(places, k, c, sdt, device)
                for k, c in enumerate(cols)]
    for first, stop, offset, nrows, size, row in segs.runs:
        if size == 0 or nrows == 0:
            continue
        s = tuple(segs.per_row(c, first, stop) + offset if key else
                  segs.per_row(c, first, stop) if isinstance(c, torch.Tensor) and c.dim() == 2 else
                  c[offset:offset + nrows * size].view(nrows, size) if isinstance(c, torch.Tensor) and c.dim() == 1
                  else c for c, key in zip(cols, keys))
        if compiled:
            s = tuple(_engine._scalar_tensor(x, sdt, device) for x in s)
        run_w = w[offset:offset + nrows * size].view(nrows, size)
        run_inner = _run_views(inner, segs, offset, nrows, size, row)
        # (ROWS in the key: GroupAdaGrad's large weights run on the same kind of views, one by one, and each key
        # keeps one graph for direct calls)
        _engine._run(compiled, _engine._key(opt, kind, run_w, run_inner, s) + (ROWS,), opt, run_w,
                     g[offset:offset + nrows * size].view(nrows, size), run_inner, s, ROWS)


def _run_views(tree, segs, offset, rows, size, row):
    """A run's views of the packed states: ``[rows, size]`` of per-element states, ``[rows, 1]`` of per-row ones."""
    if tree is None:
        return None
    if isinstance(tree, torch.Tensor):
        if tree.numel() == segs.total:
            return tree[offset:offset + rows * size].view(rows, size)
        return tree[row:row + rows].view(rows, 1)
    return tuple(_run_views(t, segs, offset, rows, size, row) for t in tree)


def _split_into(flat, states, sizes, segs):
    if flat is None:
        return
    if isinstance(flat, torch.Tensor):
        torch._foreach_copy_(list(states), _unflatten(flat, states))
        return
    for k, f in enumerate(flat):
        _split_into(f, [st[k] for st in states], sizes, segs)
