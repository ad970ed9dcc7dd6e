"""The ``embedding`` workload: lazy steps on a row-sparse gradient, against the dense step and torch's sparse peers.

One 10,000,000 x 64 fp32 table (2.56 GB), a gradient touching 4,096 distinct random rows (seed ``--seed``), made
once up front as a coalesced ``torch.sparse_coo`` tensor (``sparse_dim`` 1, as ``nn.Embedding(sparse=True)``
gives it); ``--scale`` shrinks the table and the touched rows alike. Per optimizer (sgd momentum 0.9, adam,
adagrad, ftrl with ``lazy=True``), through ``optzoo.torch.create``:

- the lazy step, its ``step()`` timed right after the torch peer's (``time_paired``: the *x peer time* ratio holds
  where the machine's speed drifts) where torch has one: ``SGD(momentum=0.9)`` on the sparse gradient,
  ``SparseAdam``, ``Adagrad``; FTRL has none;
- the dense step of the same optimizer on the same table (the gradient densified, optzoo's default path): the
  cost a lazy step must stay far below (the issue's target: >= 100x faster), timed by the bench's budget (a
  dense step over the table takes seconds, so 3 or 4 of them);
- what one lazy step allocates (:func:`allocations`, CPU only): a lazy step must never allocate a tensor of the
  table's size.

The table is one tensor for the whole workload, updated in place by every measurement (only the timing matters,
values stay finite); states live one measurement at a time (dense Adam alone holds 4 x 2.56 GB), freed between.
"""
from __future__ import annotations

import gc
import tracemalloc
import warnings

import torch

from .. import torch as _face
from ._steps import time_paired, time_steps
from .timing import device_sync, synced

__all__ = ["KEY", "OPTIMIZERS", "Table", "allocations", "run"]

KEY = "embedding"
ROWS, DIM, TOUCHED = 10_000_000, 64, 4096

#: ``(label, registered name, optzoo.torch keyword arguments, torch peer (torch.optim class name, kwargs) or None)``
OPTIMIZERS = (
    ("sgd", "sgd", {"lr": 0.01, "momentum": 0.9, "lazy": True}, ("SGD", {"lr": 0.01, "momentum": 0.9})),
    ("adam", "adam", {"lr": 1e-3, "lazy": True}, ("SparseAdam", {"lr": 1e-3})),
    ("adagrad", "adagrad", {"lr": 0.01}, ("Adagrad", {"lr": 0.01})),  # always lazy (MXNet's sparse.adagrad_update)
    ("ftrl", "ftrl", {"lr": 0.1, "lazy": True}, None),
)

#: a lazy step takes milliseconds: up to this many are timed within ``--budget`` (steadier medians than
#: ``--repeat``'s 10 on a machine whose other tenants stall a step by 100 ms now and then)
LAZY_REPEAT = 50


class Table:
    """The workload's sizes at ``scale``: ``rows`` x ``DIM`` fp32, ``touched`` rows per step."""

    def __init__(self, scale=1.0):
        self.touched = max(1, round(TOUCHED * scale))
        self.rows = max(self.touched, round(ROWS * scale))
        self.dim = DIM
        self.bytes = self.rows * self.dim * 4

    def describe(self) -> str:
        return (f"(vi) embedding: one {self.rows:,} x {self.dim} table, float32 ({self.bytes / 1e9:.3g} GB), "
                f"{self.touched:,} rows touched per step (row-sparse gradient)")

    def make(self, seed, device="cpu"):
        """``(table, grad)``: the table filled (every page resident, as a trained table's), the sparse gradient."""
        gen = torch.Generator().manual_seed(seed)
        rows = torch.randperm(self.rows, generator=gen)[:self.touched].sort().values
        values = torch.randn(self.touched, self.dim, generator=gen)
        grad = torch.sparse_coo_tensor(rows[None], values, (self.rows, self.dim), check_invariants=False)
        grad = grad.coalesce().to(device)
        table = torch.empty(self.rows, self.dim, device=device).uniform_(-0.1, 0.1)
        return table, grad


def allocations(fn) -> dict:
    """What ``fn()`` allocates on the CPU: ``largest`` (bytes of the largest single allocation), ``peak`` (the most
    bytes held at once beyond what was held before) and ``total``, from torch's CPU allocator as
    ``torch.profiler(profile_memory=True)`` records every allocation and free; ``numpy_peak`` from
    ``tracemalloc`` (numpy registers its buffers there; optzoo's correctly rounded square root goes
    through numpy)."""
    from torch.profiler import ProfilerActivity, profile
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            tracemalloc.start()  # inside: the profiler's own bookkeeping stays out of it
            try:
                fn()
                numpy_peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
    events = sorted((e for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]" and str(e.device_type()) == "DeviceType.CPU"),
                    key=lambda e: e.start_ns())
    sizes = [e.nbytes() for e in events]  # + allocated, - freed
    held = peak = 0
    for n in sizes:
        held += n
        peak = max(peak, held)
    return {"largest": max((n for n in sizes if n > 0), default=0), "peak": peak,
            "total": sum(n for n in sizes if n > 0), "numpy_peak": numpy_peak}


def _param(table, grad):
    p = torch.nn.Parameter(table)  # the same storage: every measurement updates the one table in place
    p.grad = grad
    return p


def _lazy(table, grad, name, kwargs, peer, args) -> dict:
    """The lazy step, paired with the torch peer's where there is one, then what one lazy step allocates."""
    sync = device_sync(args.device)
    opt = _face.create(name, [_param(table, grad)], **kwargs)
    repeat = max(args.repeat, LAZY_REPEAT)
    if peer is None:
        out = dict(time_steps(synced(opt.step, sync), repeat=repeat, warmup=args.warmup, budget=args.budget))
    else:
        ref = getattr(torch.optim, peer[0])([_param(table, grad)], **peer[1])
        out = dict(time_paired(synced(opt.step, sync), synced(ref.step, sync), repeat=repeat,
                               warmup=args.warmup, budget=args.budget))
        out = {"ms": out["ms"], "first_ms": out["first_ms"], "min_ms": out["min_ms"], "steps": out["steps"],
               "peer_ms": out["ref_ms"], "vs_peer": out["ratio"]}
        del ref
    if args.device.type == "cpu":
        out["alloc"] = allocations(opt.step)
    del opt
    return out


def _dense(table, grad, name, kwargs, args) -> dict:
    """The dense step of the same optimizer on the same table: the gradient densified (absent rows 0)."""
    sync = device_sync(args.device)
    dense = grad.to_dense()
    opt = _face.create(name, [_param(table, dense)], **kwargs)
    out = dict(time_steps(synced(opt.step, sync), repeat=args.repeat, warmup=args.warmup, budget=args.budget))
    del opt, dense
    return out


def _selected(specs):
    """The embedding's optimizers that ``--optimizers`` names (by registered name; the embedding keeps its own
    settings), all of them when it names none."""
    if specs is None:
        return OPTIMIZERS
    names = {name for _, name, _ in specs}
    return tuple(o for o in OPTIMIZERS if o[1] in names)


def run(args, log=lambda text: None) -> dict:
    """Measure the workload: its sizes and ``"results"``, one row per optimizer (errors reported, not raised)."""
    t = Table(args.scale)
    log(t.describe())
    table, grad = t.make(args.seed, args.device)
    rows_touched = grad._indices()[0]
    out = {"label": "(vi) embedding", "describe": t.describe(), "rows": t.rows, "dim": t.dim, "touched": t.touched,
           "table_bytes": t.bytes, "results": []}
    for label, name, kwargs, peer in _selected(None if args.optimizers is None else args.specs):
        row = {"optimizer": label, "name": name, "workload": KEY, "fused": None, "settings": kwargs,
               "peer": None if peer is None else f"torch.optim.{peer[0]}"}
        out["results"].append(row)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                lazy = _lazy(table, grad, name, kwargs, peer, args)
                gc.collect()  # the states of one measurement go before the next one's are made
                dense = _dense(table, grad, name, kwargs, args)
        except Exception as exc:  # an optimizer that cannot run: report it, go on
            row["error"] = f"{type(exc).__name__}: {exc}"[:300]
        gc.collect()
        if "error" in row:
            log(f"  {label}: {row['error']}")
            continue
        row.update(ms=lazy["ms"], first_ms=lazy["first_ms"], steps=lazy["steps"], dense_ms=dense["ms"],
                   dense_first_ms=dense["first_ms"], dense_steps=dense["steps"], vs_dense=dense["ms"] / lazy["ms"])
        for key in ("peer_ms", "vs_peer", "alloc"):
            if key in lazy:
                row[key] = lazy[key]
        row["finite"] = bool(torch.isfinite(table.index_select(0, rows_touched)).all())
        peer_text = (f"  {row['peer']} {row['peer_ms']:8.3f} ms (x peer time {row['vs_peer']:.2f})"
                     if "vs_peer" in row else "")
        alloc = (f"  lazy step allocates {row['alloc']['peak'] / 2 ** 20:.2f} MiB at most"
                 if "alloc" in row else "")
        log(f"  {label:<8} lazy {row['ms']:8.3f} ms  dense {row['dense_ms']:9.1f} ms  x dense {row['vs_dense']:7.0f}"
            + peer_text + alloc)
    del table, grad
    gc.collect()
    return out
