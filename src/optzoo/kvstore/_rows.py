"""Row-sparse gradients in the stores: a gradient's layout code and the rows it touches.

A row-sparse gradient is a ``torch.sparse_coo`` tensor with ``sparse_dim == 1`` over the rows of a dense
weight (``nn.Embedding(sparse=True)``'s); the stores send its (coalesced) row ids and rows only.
"""
from __future__ import annotations

import torch

__all__ = ["NONE", "SPARSE", "DENSE", "layout_code", "local_rows"]


#: Layout codes of a gradient, agreed over the workers by their max: dense wins over row-sparse.
NONE, SPARSE, DENSE = 0, 1, 2


def layout_code(grad):
    if grad is None:
        return NONE
    return DENSE if grad.layout is torch.strided else SPARSE


def local_rows(p, name):
    """``(row ids, rows)`` of ``p.grad`` coalesced (empty for a missing gradient); a TypeError or ValueError
    naming the parameter for a gradient that is not row-sparse over ``p``'s rows."""
    g = p.grad
    if g is None:
        return (torch.zeros(0, dtype=torch.int64, device=p.device),
                torch.zeros((0, *p.shape[1:]), dtype=p.dtype, device=p.device))
    if g.layout is not torch.sparse_coo:
        raise TypeError(f"the gradient of parameter {name!r} has layout {g.layout}: expected torch.strided or "
                        "torch.sparse_coo (row-sparse, sparse_dim 1)")
    if p.dim() < 1 or g.sparse_dim() != 1 or g.shape != p.shape:
        raise ValueError(f"the gradient of parameter {name!r} is sparse with sparse_dim {g.sparse_dim()} and "
                         f"shape {tuple(g.shape)}: expected row-sparse (sparse_dim 1) of the parameter's shape "
                         f"{tuple(p.shape)}")
    if g.dtype != p.dtype or g.device != p.device:
        raise ValueError(f"the gradient of parameter {name!r} is {g.dtype} on {g.device}: expected the "
                         f"parameter's {p.dtype} on {p.device}")
    g = g.coalesce()
    return g._indices()[0], g._values()
