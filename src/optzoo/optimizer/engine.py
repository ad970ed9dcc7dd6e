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
parameter and spread over the bucket as per-element tensors. Per-tensor norms (LARS, LAMB) and
GroupAdaGrad's row means are segment reductions (:class:`Segments`). The math is the optimizer's own
``prepare`` + ``kernel``: the reference path calls the same two per tensor.
"""
from __future__ import annotations

import functools
import warnings

import torch

from . import _numerics, _tree

__all__ = ["Bucket", "Runner", "Segments", "sum_sq", "supports_buckets"]


class Segments:
    """Where each parameter lies in a flat bucket, for per-tensor reductions and per-parameter scalars."""

    def __init__(self, sizes, device):
        self.sizes = list(sizes)
        self.lengths = torch.tensor(self.sizes, dtype=torch.int64, device=device)
        self.total = sum(self.sizes)
        self._ids = None

    @property
    def ids(self):
        """Segment index of every element (built on first use)."""
        if self._ids is None:
            self._ids = torch.repeat_interleave(torch.arange(len(self.sizes), device=self.lengths.device),
                                                self.lengths, output_size=self.total)
        return self._ids

    def spread(self, values, dtype):
        """Per-segment values as a per-element tensor."""
        v = torch.tensor(values, dtype=dtype, device=self.lengths.device)
        return v[self.ids]


def sum_sq(x, seg=None):
    """:math:`\\sum x^2` per tensor as an fp32 value, for the norms of LARS and LAMB.

    Per tensor (``seg`` None): a 0-d tensor holding MXNet's own sequential fp32 sum
    (:func:`~optzoo.optimizer._numerics.sum_sq`). Over a bucket: one value per element, its segment's
    sum: MXNet's sums again when eager on the CPU; compiled (or on other devices), accumulated in fp64
    and rounded to fp32 (MXNet's order cannot be vectorised; this is within the sequential sum's
    rounding error of it).
    """
    if seg is None:
        return torch.tensor(_numerics.sum_sq(x), dtype=torch.float32, device=x.device)
    if x.device.type == "cpu" and not torch.compiler.is_compiling():  # eager: MXNet's sums, one per tensor
        return seg.spread([_numerics.sum_sq(part) for part in torch.split(x, seg.sizes)], torch.float32)
    sq = x.to(torch.float64) * x.to(torch.float64)
    if len(seg.sizes) == 1:
        return sq.sum().to(torch.float32)
    sums = torch.segment_reduce(sq, "sum", lengths=seg.lengths)
    return sums.to(torch.float32)[seg.ids]


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


def _compiled_step():
    fn = _COMPILED.get("step")
    if fn is None:
        # one compiled graph per optimizer class, option set and bucket shape: more than dynamo's default 8
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
        try:
            # emulate_precision_casts: round fp16/bf16 intermediates as eager torch does
            fn = torch.compile(_fused_step, dynamic=False, options={"emulate_precision_casts": True})
        except Exception as exc:  # pragma: no cover - no compiler backend
            warnings.warn(f"torch.compile is unavailable ({exc}); optzoo runs the eager kernels", RuntimeWarning)
            fn = _fused_step
        _COMPILED["step"] = fn
    return fn


def _run_compiled(*args):
    """The compiled step; if compilation fails (no C compiler, unsupported platform), warn once and run
    the eager kernel from then on. Compilation happens before the kernel touches any tensor."""
    fn = _compiled_step()
    try:
        fn(*args)
    except Exception as exc:
        if fn is _fused_step:
            raise
        warnings.warn(f"optzoo: compiling the fused optimizer kernel failed ({type(exc).__name__}: "
                      f"{str(exc).splitlines()[0] if str(exc) else ''}); running the eager kernels instead",
                      RuntimeWarning, stacklevel=4)
        _COMPILED["step"] = _fused_step
        _fused_step(*args)


def supports_buckets(opt, dtype, device) -> bool:
    """Whether ``opt`` can run over flat buckets: a split rule and states shaped like the weight."""
    if not type(opt).has_kernel():
        return False
    probe = torch.empty(8, dtype=dtype, device="meta")
    return all(leaf.numel() == 8 for leaf in _tree.leaves(opt.create_state_multi_precision(0, probe)))


class Bucket:
    """Parameters of one device and dtype, laid out contiguously; their data and grads become views."""

    def __init__(self, optimizer, indices, params, states=None):
        self.optimizer = optimizer
        self.indices = list(indices)
        self.params = list(params)
        first = self.params[0]
        self.dtype, self.device = first.dtype, first.device
        sizes = [p.numel() for p in self.params]
        self.segments = Segments(sizes, self.device)
        self.offsets = [sum(sizes[:k]) for k in range(len(sizes))]
        with torch.no_grad():
            self.w = torch.empty(self.segments.total, dtype=self.dtype, device=self.device)
            self.g = torch.zeros_like(self.w)
            for p, o, n in zip(self.params, self.offsets, sizes):
                self.w[o:o + n].copy_(p.detach().reshape(-1))
                p.data = self.w[o:o + n].view_as(p)
                if p.grad is not None:  # a parameter without a gradient keeps none
                    self.g[o:o + n].copy_(p.grad.reshape(-1))
                    p.grad = self.g[o:o + n].view_as(p)
            self.state = optimizer.create_state_multi_precision(self.indices[0], self.w)
            for k, existing in enumerate(states or []):
                if existing is not None:
                    _tree.assign(self.state_of(k), existing)

    def view(self, k, flat):
        """The k-th parameter's slice of a flat tensor (or state tree)."""
        if flat is None:
            return None
        if isinstance(flat, torch.Tensor):
            o, n = self.offsets[k], self.segments.sizes[k]
            return flat[o:o + n].view(self.params[k].shape) if flat.numel() == self.segments.total else flat
        return tuple(self.view(k, f) for f in flat)

    def state_of(self, k):
        return self.view(k, self.state)

    def gather_grads(self):
        """Make every ``.grad`` the bucket's view again (copying a gradient that autograd or the user
        allocated anew, e.g. after ``zero_grad(set_to_none=True)``); returns which parameters have one."""
        has = []
        for k, p in enumerate(self.params):
            view = self.g[self.offsets[k]:self.offsets[k] + self.segments.sizes[k]].view_as(p)
            if p.grad is None:
                view.zero_()
                has.append(False)
                continue
            if p.grad.data_ptr() != view.data_ptr():
                view.copy_(p.grad)
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
            if not supports_buckets(self.optimizer, dtype, device):
                continue
            bucket = Bucket(self.optimizer, [m[0] for m in members], [m[1] for m in members],
                            [m[2] for m in members])
            self.buckets.append(bucket)
            views.update({i: bucket.state_of(k) for k, i in enumerate(bucket.indices)})
        return views

    def step(self, fresh):
        """Update every bucket whose parameters are all in ``fresh``; returns the indices it updated."""
        done = set()
        for bucket in self.buckets or ():
            if all(i in fresh for i in bucket.indices) and all(bucket.gather_grads()):
                self._step_bucket(bucket)
                done.update(bucket.indices)
        return done

    def _scalars(self, bucket, dtype, sdt):
        opt, indices = self.optimizer, bucket.indices
        counts = opt._index_update_count
        first = counts.get(indices[0])
        uniform = not opt._prepare_per_index and all(counts.get(i) == first for i in indices)
        read = opt._count_and_read(indices, together=uniform)
        cache, per = {}, []
        for i, key in zip(indices, read):
            if not (uniform and key in cache):  # per index otherwise: prepare may advance per-index state
                lr, wd, t = key
                cache[key] = opt.prepare(lr=lr, wd=wd, t=t, index=i, dtype=dtype)
            per.append(cache[key])
        if len(cache) == 1 and uniform:
            return per[0]
        cols = list(zip(*per))
        return tuple(col[0] if all(c == col[0] for c in col) else bucket.segments.spread(col, sdt) for col in cols)

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
        s = self._scalars(bucket, w.dtype, sdt)
        with torch.no_grad():
            if self.fused:
                s = tuple(torch.tensor(x, dtype=sdt, device=w.device) if not isinstance(x, torch.Tensor) else x
                          for x in s)
                _run_compiled(opt, w, bucket.g, inner, s, bucket.segments, low)
            elif opt._segment_kernel or bucket.segments.total <= EAGER_CHUNK:
                _fused_step(opt, w, bucket.g, inner, s, bucket.segments, low)
            else:
                # elementwise kernels run eagerly over cache-sized chunks: each op's temporaries then come
                # from the allocator's free lists instead of fresh (page-faulting) mappings of the bucket's size
                n = bucket.segments.total
                for lo in range(0, n, EAGER_CHUNK):
                    sl = slice(lo, min(lo + EAGER_CHUNK, n))
                    part = tuple(x[sl] if isinstance(x, torch.Tensor) and x.dim() == 1 and x.numel() == n else x
                                 for x in s)
                    _fused_step(opt, w[sl], bucket.g[sl], _slice_tree(inner, sl), part, None,
                                None if low is None else low[sl])


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
    if not supports_buckets(opt, w0.dtype, w0.device) or any(st is None for st in states) and \
            any(st is not None for st in states):
        return False
    bucket = _ListBucket(indices, weights, grads, states)
    Runner(opt, False)._step_bucket(bucket)
    bucket.write_back()
    return True


class _ListBucket:
    """A Bucket over copies: the flat concatenation of separate tensors, written back after the step."""

    def __init__(self, indices, weights, grads, states):
        self.indices, self.params = list(indices), list(weights)
        self.segments = Segments([w.numel() for w in weights], weights[0].device)
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
