"""Row-sparse gradients: the rows a ``torch.sparse_coo`` gradient (``sparse_dim == 1``) touches, and the
gather / scatter of those rows of a weight and of every tensor of its state (MXNet's lazy updates).

A lazy step reads and writes only the gradient's rows (``index_select`` / ``index_copy_``): its cost is
proportional to the rows touched, and it never allocates a tensor of the table's size.
"""
from __future__ import annotations

import torch

__all__ = ["rows_of", "gather", "scatter_", "write_rows_"]


def rows_of(grad):
    """``(rows, values)`` of a row-sparse gradient, repeated rows summed and sorted (MXNet's row_sparse storage
    holds unique sorted rows), as ``coalesce`` gives them."""
    g = grad.coalesce()
    return g._indices()[0], g._values()


def gather(state, rows):
    """The ``rows`` of every tensor of a state (nested tuples of tensors and None)."""
    if state is None:
        return None
    if isinstance(state, torch.Tensor):
        return state.index_select(0, rows)
    return type(state)(gather(s, rows) for s in state)


def scatter_(state, new, rows):
    """Write ``new`` (as :func:`gather` shaped it) back into the ``rows`` of ``state``, in place."""
    if state is None or new is None:
        return
    if isinstance(state, torch.Tensor):
        if new is not state:
            state.index_copy_(0, rows, new.to(state.dtype))
        return
    for s, n in zip(state, new):
        scatter_(s, n, rows)


def write_rows_(weight, low, state, new_w, new_s, rows):
    """A lazy update's results written back: ``new_s`` into the ``rows`` of ``state``, ``new_w`` (None: unchanged)
    into those of ``weight`` and of ``low`` (the fp16/bf16 weight of an fp32 master ``weight``, or None)."""
    scatter_(state, new_s, rows)
    scatter_(weight, new_w, rows)
    scatter_(low, new_w, rows)
