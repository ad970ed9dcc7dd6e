"""The fast path: one optimizer rule executed over contiguous buckets, eagerly or compiled.

A :class:`Bucket` lays out the parameters of one device and dtype contiguously: the parameters and their
``.grad`` become views into one flat weight and one flat gradient buffer (as DDP's
``gradient_as_bucket_view``), and the optimizer states are created flat. A step then runs the
optimizer's ``kernel`` once over the whole bucket instead of once per tensor:

- ``fused=None`` (default): the kernel runs eagerly over the flat tensors: a handful of large
  memory-bound passes, no compilation.
- ``fused=True``: the kernel is compiled with ``torch.compile`` (one fused loop per bucket; compiled
  code is cached across processes by inductor's on-disk cache). Without a working compiler it falls
  back to the eager kernel with one warning.

Per-parameter scalars (learning rate and weight decay after multipliers, update counts, Nadam's
schedule) are prepared in Python once per bucket when they agree across its parameters, else per
parameter and spread over the bucket as per-element tensors. Kernels with per-tensor reductions (the
norms of LARS and LAMB) run run by run (:class:`Segments`): consecutive parameters of one size viewed
as a ``[k, n]`` matrix whose rows are the parameters, so a norm is a row sum and a per-parameter scalar
a ``[k, 1]`` column (:data:`ROWS`); compiled, one dynamic-shape graph serves all runs. Optimizers with a
state per row (GroupAdaGrad) stack the rows of consecutive parameters of one width the same way. Three
optional optimizer hooks extend the protocol: ``_kernel_noise`` (SGLD: the noise is drawn per parameter
with ``_noise`` before the kernel and handed to it as its last scalar), ``_bucket_ready`` +
``_accumulate_bucket`` (LBSGD's gradient accumulation) and ``_check_indices`` (checks the reference path
makes per update). The math is the optimizer's own ``prepare`` + ``kernel``: the reference path calls
the same two per tensor.
"""
from __future__ import annotations

import functools
import warnings

import torch

from . import _numerics, _tree
from ._numerics import ROWS, sum_sq_of as sum_sq

__all__ = ["Bucket", "ROWS", "Runner", "Segments", "sum_sq", "supports_buckets"]


class Segments:
    """Where each parameter lies in a flat bucket, for per-parameter scalars and per-tensor reductions.

    ``runs`` are the maximal stretches of consecutive parameters of one size, ``(first, stop, offset, rows,
    cols, row_offset)``: a ``[rows, cols]`` matrix of the bucket whose rows are the parameters (per-tensor
    sums are row sums). With ``row_counts`` (2-D parameters whose optimizer keeps a state per row, as
    GroupAdaGrad) a run is instead the consecutive parameters of one column count, their rows stacked, and
    ``row_offset`` locates it in the per-row states.
    """

    def __init__(self, sizes, device, row_counts=None):
        self.sizes = list(sizes)
        self.device = device
        self.total = sum(self.sizes)
        self.offsets = [0]
        for n in self.sizes:
            self.offsets.append(self.offsets[-1] + n)
        self.row_counts = list(row_counts) if row_counts is not None else None
        rows = self.row_counts or [1] * len(self.sizes)
        cols = [n // r if r else 0 for n, r in zip(self.sizes, rows)] if row_counts is not None else self.sizes
        self.total_rows = sum(rows)
        self.row_offsets = [0]
        for r in rows:
            self.row_offsets.append(self.row_offsets[-1] + r)
        self.runs = []
        k, row = 0, 0
        while k < len(self.sizes):
            stop = k
            while stop < len(self.sizes) and cols[stop] == cols[k]:
                stop += 1
            nrows = sum(rows[k:stop])
            self.runs.append((k, stop, self.offsets[k], nrows, cols[k], row))
            k, row = stop, row + nrows

    def spread(self, values, dtype):
        """Per-segment values as a per-element tensor (written run by run: no per-element index)."""
        v = torch.tensor(values, dtype=dtype, device=self.device)
        out = torch.empty(self.total, dtype=dtype, device=self.device)
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


_COMPILED = {}
_WARNED = []


def _fused_step(opt, w, g, inner, s, seg, low):
    """One bucket update, in place: cast, kernel, write back (compiled as one loop under fused=True)."""
    g = g.to(w.dtype)
    new_w, new_s = type(opt).kernel(opt, w, g, inner, s, seg)
    _write(inner, new_s)
    w.copy_(new_w)
    if low is not None:
        low.copy_(w)


#: elements per chunk of the eager fast path (1 MiB of fp32)
EAGER_CHUNK = 1 << 18
_HEAP_SETTLED = [False]


def _settle_heap(device):
    """Free one 30 MiB CPU tensor, once per process, before the first chunked eager step.

    glibc serves allocations above its mmap threshold (128 KiB at start) with fresh mappings and returns
    heap tops above twice that to the system; freeing a mapped block of up to 32 MiB raises both
    thresholds to its size, as any training process does soon enough. Until then, every 1 MiB temporary
    of every chunk is a fresh mapping that page-faults: measured on one 16M-element tensor, SGD's eager
    step took 11-13x torch's fused Adam instead of 1.6-2.1x, depending on what the process freed before.
    """
    if device.type == "cpu" and not _HEAP_SETTLED[0]:
        _HEAP_SETTLED[0] = True
        torch.empty(30 << 18).fill_(0)


def _slice_tree(tree, sl):
    if tree is None:
        return None
    if isinstance(tree, torch.Tensor):
        return tree[sl]
    return tuple(_slice_tree(t, sl) for t in tree)


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
    runs as a row-reduction loop and an elementwise loop. Patched only while optzoo's own kernels compile."""

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


def _compiled(kind):
    """The compiled step: ``"step"`` over whole buckets (static shapes: one graph per bucket shape), or
    ``"rows"`` over the ``[k, n]`` runs of a bucket (dynamic shapes: one graph for every run)."""
    fn = _COMPILED.get(kind)
    if fn is None:
        # one compiled graph per optimizer class, option set and bucket shape: more than dynamo's default 8
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
        try:
            # emulate_precision_casts: round fp16/bf16 intermediates as eager torch does
            options = {"emulate_precision_casts": True}
            if kind == "rows":  # recompute what both the row sums and the update read (LAMB's u) instead of
                # storing it: a bucket-sized temporary costs its page faults on every step (LAMB, one 16M
                # tensor: 28 -> 12 ms; torch's fused Adam 7)
                options.update(realize_reads_threshold=16, realize_opcount_threshold=200)
            fn = torch.compile(_fused_step, dynamic=kind == "rows", options=options)
        except Exception as exc:  # pragma: no cover - no compiler backend
            warnings.warn(f"torch.compile is unavailable ({exc}); optzoo runs the eager kernels", RuntimeWarning)
            fn = _fused_step
        _COMPILED[kind] = fn
    return fn


def _run_compiled(kind, *args):
    """The compiled step; if compilation fails (no C compiler, unsupported platform), warn once and run
    the eager kernel from then on. Compilation happens before the kernel touches any tensor."""
    fn = _compiled(kind)
    try:
        if kind == "rows":
            with _NoOuterLoopFusion():
                fn(*args)
        else:
            fn(*args)
    except Exception as exc:
        if fn is _fused_step:
            raise
        warnings.warn(f"optzoo: compiling the fused optimizer kernel failed ({type(exc).__name__}: "
                      f"{str(exc).splitlines()[0] if str(exc) else ''}); running the eager kernels instead",
                      RuntimeWarning, stacklevel=4)
        _COMPILED[kind] = _fused_step
        _fused_step(*args)


def supports_buckets(opt, dtype, device):
    """How ``opt`` can run over flat buckets: ``"elementwise"`` (a split rule and states shaped like the
    weight), ``"rows"`` (2-D weights, states shaped like the weight or one value per row, as GroupAdaGrad's),
    or False."""
    if not (type(opt).has_kernel() or hasattr(opt, "_accumulate_bucket")):
        return False
    probe = torch.empty((2, 4), dtype=dtype, device="meta")
    try:
        leaves = _tree.leaves(opt.create_state_multi_precision(0, probe))
    except ValueError:  # pragma: no cover - an optimizer refusing the probe runs on the reference path
        return False
    if all(leaf.numel() == 8 for leaf in leaves):
        return "elementwise"
    if all(leaf.numel() == 8 or tuple(leaf.shape) == (2, 1) for leaf in leaves):
        return "rows"
    return False


class Bucket:
    """Parameters of one device and dtype, laid out contiguously; their data and grads become views."""

    def __init__(self, optimizer, indices, params, states=None, layout="elementwise"):
        self.optimizer = optimizer
        self.indices = list(indices)
        self.params = list(params)
        first = self.params[0]
        self.dtype, self.device = first.dtype, first.device
        sizes = [p.numel() for p in self.params]
        rows = [p.shape[0] for p in self.params] if layout == "rows" else None
        self.segments = Segments(sizes, self.device, rows)
        self.offsets = self.segments.offsets[:-1]
        self._grad_views = None
        self._buffers = {}
        with torch.no_grad():
            self.w = torch.empty(self.segments.total, dtype=self.dtype, device=self.device)
            self.g = torch.zeros_like(self.w)
            for p, o, n in zip(self.params, self.offsets, sizes):
                self.w[o:o + n].copy_(p.detach().reshape(-1))
                p.data = self.w[o:o + n].view_as(p)
                if p.grad is not None:  # a parameter without a gradient keeps none
                    self.g[o:o + n].copy_(p.grad.reshape(-1))
                    p.grad = self.g[o:o + n].view_as(p)
            if layout == "rows":  # per-row states: created per parameter, then laid out flat
                self.state = _cat_states([optimizer.create_state_multi_precision(i, p.detach())
                                          for i, p in zip(self.indices, self.params)])
            else:
                self.state = optimizer.create_state_multi_precision(self.indices[0], self.w)
            for k, existing in enumerate(states or []):
                if existing is not None:
                    _tree.assign(self.state_of(k), existing)

    def view(self, k, flat):
        """The k-th parameter's slice of a flat tensor (or state tree)."""
        if flat is None:
            return None
        if isinstance(flat, torch.Tensor):
            seg = self.segments
            if flat.numel() == seg.total:
                o, n = self.offsets[k], seg.sizes[k]
                return flat[o:o + n].view(self.params[k].shape)
            if seg.row_counts is not None and flat.numel() == seg.total_rows:
                o = seg.row_offsets[k]
                return flat[o:o + seg.row_counts[k]].view(seg.row_counts[k], 1)
            return flat
        return tuple(self.view(k, f) for f in flat)

    def buffer(self, name, dtype):
        """``(flat, views)``: a scratch tensor the size of the bucket (zeros when made, then kept across
        steps; made anew when asked in another dtype) and its per-parameter views."""
        got = self._buffers.get(name)
        if got is None or got[0].dtype != dtype:
            flat = torch.zeros(self.segments.total, dtype=dtype, device=self.device)
            got = self._buffers[name] = (flat, [self.view(k, flat) for k in range(len(self.indices))])
        return got

    def state_of(self, k):
        return self.view(k, self.state)

    def gather_grads(self):
        """Make every ``.grad`` the bucket's view again (copying a gradient that autograd or the user
        allocated anew, e.g. after ``zero_grad(set_to_none=True)``); returns which parameters have one."""
        if self._grad_views is None:
            self._grad_views = [self.g[o:o + n].view_as(p) for p, o, n in
                                zip(self.params, self.offsets, self.segments.sizes)]
        has = []
        for p, view in zip(self.params, self._grad_views):
            grad = p.grad
            if grad is view:
                has.append(True)
            elif grad is None:
                view.zero_()
                has.append(False)
            else:
                if grad.data_ptr() != view.data_ptr() or grad.shape != view.shape:
                    view.copy_(grad)
                p.grad = view
                has.append(True)
        return has


class Runner:
    """The buckets of one optimizer's parameters and the fast step over them, shared by the Trainer and the
    torch face. ``step`` handles whole buckets whose parameters all have a gradient; the caller runs the
    reference path (on the same views) for anything it leaves."""

    def __init__(self, optimizer, fused):
        self.optimizer = optimizer
        self.fused = fused
        self.buckets = None

    def build(self, indices, params, states):
        """Lay out the parameters; returns index -> state view (the states now live in the buckets)."""
        groups = {}
        for i, p, st in zip(indices, params, states):
            groups.setdefault((p.device, p.dtype), []).append((i, p, st))
        self.buckets, views = [], {}
        if self.optimizer._prepare_per_index and len(groups) > 1:
            return views  # bucket by bucket would change the order of a per-index sequence (Nadam)
        for (device, dtype), members in groups.items():
            layout = supports_buckets(self.optimizer, dtype, device)
            if not layout or layout == "rows" and any(m[1].dim() != 2 for m in members):
                continue
            bucket = Bucket(self.optimizer, [m[0] for m in members], [m[1] for m in members],
                            [m[2] for m in members], layout)
            self.buckets.append(bucket)
            views.update({i: bucket.state_of(k) for k, i in enumerate(bucket.indices)})
        return views

    def step(self, fresh):
        """Update every bucket whose parameters are all in ``fresh``; returns the indices it updated."""
        done = set()
        ready = getattr(self.optimizer, "_bucket_ready", None)  # e.g. LBSGD: indices accumulating in step
        for bucket in self.buckets or ():
            if all(i in fresh for i in bucket.indices) and (ready is None or ready(bucket.indices)) \
                    and all(bucket.gather_grads()):
                self._step_bucket(bucket)
                done.update(bucket.indices)
        return done

    def _prepared(self, bucket, dtype):
        """Count and read every index of the bucket, then ``prepare``: one tuple of scalars per index, or a
        single one when they all agree."""
        opt, indices = self.optimizer, bucket.indices
        counts = opt._index_update_count
        first = counts.get(indices[0])
        equal = all(counts.get(i) == first for i in indices)
        uniform = not opt._prepare_per_index and equal
        # equal counts read the same (lr, wd, t) together as one by one; an optimizer whose reads have side
        # effects per index (LARS's lr pairs) says whether a list read reproduces them (_reads_per_index)
        per_index = opt._prepare_per_index if opt._reads_per_index is None else opt._reads_per_index
        together = equal and not per_index
        read = opt._count_and_read(indices, together=together)
        prepare = functools.partial(opt.prepare, dtype=dtype)
        if not uniform:  # per index, in index order: prepare may advance per-index state
            return [prepare(lr=lr, wd=wd, t=t, index=i) for i, (lr, wd, t) in zip(indices, read)], read
        cache, per = {}, []
        for i, key in zip(indices, read):
            s = cache.get(key)
            if s is None:
                lr, wd, t = key
                s = cache[key] = prepare(lr=lr, wd=wd, t=t, index=i)
            per.append(s)
        return ([per[0]] if len(cache) == 1 else per), read

    @staticmethod
    def _columns(per):
        """Per-index tuples as columns: a column's single value where it agrees across the indices, else
        the list of values."""
        if len(per) == 1:
            return list(per[0])
        return [col[0] if col.count(col[0]) == len(col) else list(col) for col in zip(*per)]

    def _step_bucket(self, bucket):
        opt = self.optimizer
        mp = opt._mp(bucket.w)
        if mp:
            w, inner = opt._split_mp(bucket.state)
            low = bucket.w
        else:
            w, inner, low = bucket.w, bucket.state, None
        # scalars are held in the widest dtype the kernel computes in (fp32 states with fp16 weights)
        sdt = functools.reduce(torch.promote_types, [x.dtype for x in _tree.leaves(inner)], w.dtype)
        check = getattr(opt, "_check_indices", None)  # the reference path's per-update checks (GroupAdaGrad's wd)
        if check is not None:
            check(bucket.indices)
        per, read = self._prepared(bucket, w.dtype)
        cols = self._columns(per)
        if opt._kernel_noise:
            cols.append(self._draw(bucket, w, read))
        with torch.no_grad():
            g = bucket.g
            accumulate = getattr(opt, "_accumulate_bucket", None)
            if accumulate is not None:  # LBSGD: the kernel sees the accumulated gradients, when it runs
                g = accumulate(bucket, w.dtype)
                if g is None:
                    return
            if opt._segment_kernel or bucket.segments.row_counts is not None:
                self._step_runs(bucket, w, g, inner, low, cols, sdt)
                return
            s = tuple(bucket.segments.spread(c, sdt) if isinstance(c, list) else c for c in cols)
            if self.fused:
                s = tuple(torch.tensor(x, dtype=sdt, device=w.device) if not isinstance(x, torch.Tensor) else x
                          for x in s)
                _run_compiled("step", opt, w, g, inner, s, bucket.segments, low)
            elif bucket.segments.total <= EAGER_CHUNK:
                _fused_step(opt, w, g, inner, s, bucket.segments, low)
            else:
                # elementwise kernels run eagerly over cache-sized chunks: each op's temporaries then come
                # from the allocator's free lists instead of fresh (page-faulting) mappings of the bucket's size
                n = bucket.segments.total
                _settle_heap(w.device)
                for lo in range(0, n, EAGER_CHUNK):
                    sl = slice(lo, min(lo + EAGER_CHUNK, n))
                    part = tuple(x[sl] if isinstance(x, torch.Tensor) and x.dim() == 1 and x.numel() == n else x
                                 for x in s)
                    _fused_step(opt, w[sl], g[sl], _slice_tree(inner, sl), part, None,
                                None if low is None else low[sl])

    def _draw(self, bucket, w, read):
        """A stochastic kernel's noise, drawn before it runs: the optimizer's own ``_noise(weight, lr)`` per
        parameter, in index order, into a flat buffer that the kernel gets as its last scalar (the
        reference path's draws, the same generator calls in the same order)."""
        buf, parts = bucket.buffer("noise", w.dtype)
        for part, (lr, _, _) in zip(parts, read):
            part.copy_(self.optimizer._noise(part, lr))
        return buf

    def _step_runs(self, bucket, w, g, inner, low, cols, sdt):
        """A kernel with per-tensor (or per-row) reductions, run by run: ``[rows, n]`` views whose rows are
        the parameters (or, with per-row states, their rows), per-parameter scalars as ``[rows, 1]``
        columns (no per-element index or scalar tensor). Compiled, one dynamic-shape graph serves every run."""
        opt, device, segs = self.optimizer, w.device, bucket.segments
        as_tensor = functools.partial(torch.tensor, dtype=sdt, device=device)
        cols = [as_tensor(c).view(-1, 1) if isinstance(c, list) else as_tensor(c) if self.fused else c
                for c in cols]
        for first, stop, offset, rows, size, row in segs.runs:
            if size == 0 or rows == 0:
                continue
            s = tuple(segs.per_row(c, first, stop) if isinstance(c, torch.Tensor) and c.dim() == 2 else c
                      for c in cols)
            args = (opt, w[offset:offset + rows * size].view(rows, size),
                    g[offset:offset + rows * size].view(rows, size),
                    _run_views(inner, segs, offset, rows, size, row), s, ROWS,
                    None if low is None else low[offset:offset + rows * size].view(rows, size))
            if self.fused:
                _run_compiled("rows", *args)
            else:
                _fused_step(*args)


def _run_views(tree, segs, offset, rows, size, row):
    """A run's views of the flat states: ``[rows, size]`` of per-element states, ``[rows, 1]`` of per-row ones."""
    if tree is None:
        return None
    if isinstance(tree, torch.Tensor):
        if tree.numel() == segs.total:
            return tree[offset:offset + rows * size].view(rows, size)
        return tree[row:row + rows].view(rows, 1)
    return tuple(_run_views(t, segs, offset, rows, size, row) for t in tree)


#: The MXNet-style ``update`` with a list runs it as one bucket when the tensors are this many and this
#: small on average: concatenating costs a copy in and out, which pays off against one launch per op
#: per tensor only for small tensors (the per-tensor loop is faster for large ones).
LIST_MIN_TENSORS = 8
LIST_MAX_MEAN_NUMEL = 1 << 16


def update_lists(opt, indices, weights, grads, states) -> bool:
    """Run a checked list call of ``opt.update`` over one temporary flat bucket; False if not applicable."""
    if (len(indices) < LIST_MIN_TENSORS or not type(opt).has_kernel()
            or sum(w.numel() for w in weights) > LIST_MAX_MEAN_NUMEL * len(weights)):
        return False
    w0 = weights[0]
    if any(w.dtype != w0.dtype or w.device != w0.device for w in weights):
        return False
    if supports_buckets(opt, w0.dtype, w0.device) != "elementwise" or any(st is None for st in states) and \
            any(st is not None for st in states):
        return False
    bucket = _ListBucket(indices, weights, grads, states)
    Runner(opt, False)._step_bucket(bucket)
    bucket.write_back()
    return True


class _ListBucket(Bucket):
    """A Bucket over copies: the flat concatenation of separate tensors, written back after the step."""

    def __init__(self, indices, weights, grads, states):  # not Bucket's: the tensors stay where they are
        self.indices, self.params = list(indices), list(weights)
        self.dtype, self.device, self._buffers = weights[0].dtype, weights[0].device, {}
        self.segments = Segments([w.numel() for w in weights], weights[0].device)
        self.offsets = self.segments.offsets[:-1]
        self.w = torch.cat([w.reshape(-1) for w in weights])
        self.g = torch.cat([g.reshape(-1) for g in grads])
        self.state = _cat_states(states)
        self._states = states

    def write_back(self):
        for w, part in zip(self.params, torch.split(self.w, self.segments.sizes)):
            w.copy_(part.view_as(w))
        _split_into(self.state, self._states, self.segments.sizes)


def _cat_states(states):
    first = states[0]
    if first is None:
        return None
    if isinstance(first, torch.Tensor):
        return torch.cat([st.reshape(-1) for st in states])
    return tuple(_cat_states([st[k] for st in states]) for k in range(len(first)))


def _split_into(flat, states, sizes):
    if flat is None:
        return
    if isinstance(flat, torch.Tensor):
        for st, part in zip(states, torch.split(flat, sizes)):
            st.copy_(part.view_as(st))
        return
    for k, f in enumerate(flat):
        _split_into(f, [st[k] for st in states], sizes)
