"""1-bit sign packing and the majority vote of signSGD with majority vote (Bernstein et al., 2019).

Each worker sends one bit per element: bit ``k`` of byte ``j`` is 1 when element ``8j + k`` is
:math:`\\ge 0`. Zero is sent as +1, as Bernstein et al. do (a second bit for zero would double the
traffic for a case that is rare in floating point). The vote of :math:`N` workers is

.. math:: v = \\mathrm{sign}\\Big(\\sum_{r=1}^{N} s_r\\Big),\\qquad s_r \\in \\{-1, +1\\},

which is 0 on a tie (possible for an even :math:`N`): the element does not move.
"""
from __future__ import annotations

import torch

from ..optimizer import _tree

__all__ = ["packed_size", "pack_signs", "unpack_signs", "vote", "vote_update"]

_SHIFTS = torch.arange(8, dtype=torch.uint8)


def packed_size(n: int) -> int:
    """Bytes that carry the signs of ``n`` elements: :math:`\\lceil n/8 \\rceil`."""
    return -(-n // 8)


def pack_signs(x: torch.Tensor) -> torch.Tensor:
    """The signs of a tensor as ``ceil(n/8)`` uint8 bytes (bit set for :math:`x \\ge 0`; a bool tensor is
    taken as the bits themselves)."""
    x = x.reshape(-1)
    bits = (x if x.dtype == torch.bool else x >= 0).to(torch.uint8)
    pad = packed_size(bits.numel()) * 8 - bits.numel()
    if pad:
        bits = torch.cat([bits, bits.new_zeros(pad)])
    return (bits.view(-1, 8) << _SHIFTS.to(bits.device)).sum(1, dtype=torch.uint8)


def _bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    return ((packed.unsqueeze(-1) >> _SHIFTS.to(packed.device)) & 1).reshape(*packed.shape[:-1], -1)[..., :n]


def unpack_signs(packed: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` signs (int8, -1 or +1) from ``pack_signs`` output."""
    return _bits(packed, n).to(torch.int8) * 2 - 1


def vote(gathered: torch.Tensor, n: int) -> torch.Tensor:
    """The majority vote (int8 -1, 0 or +1) of ``N`` workers' packed signs, ``gathered`` of shape
    ``(N, ceil(n/8))``: with :math:`c` workers sending +1, :math:`\\sum_r s_r = 2c - N`."""
    ones = _bits(gathered, n).sum(0, dtype=torch.int32)
    return torch.sign(2 * ones - gathered.shape[0]).to(torch.int8)


def vote_update(kv, updater, params, indices) -> None:
    """One sign-vote step of ``updater``'s optimizer (Signum/SignSGD) on ``params`` (the parameters of
    ``indices``): each worker's local ``direction`` (its own momentum), the majority vote of the workers'
    signs through ``kv.vote``, then ``apply_vote`` with the optimizer's own decay terms."""
    opt, states, synced = updater.optimizer, updater.states, updater.states_synced
    refuse = getattr(kv, "refuse_sparse", None)
    if refuse is not None:  # the same error on every worker, before anything changes
        refuse(indices, params, f"{type(opt).__name__}'s sign vote")
    for i, p in zip(indices, params):
        if p.grad is None:  # fresh on another worker only: this one votes with a zero gradient
            p.grad = torch.zeros_like(p)
        if i not in states:
            states[i] = opt.create_state_multi_precision(i, p.detach())
        elif not synced.get(i, True):
            states[i] = _tree.to_device(states[i], p.device)
        synced[i] = True
    todo = []
    with torch.no_grad():
        for i, p, (lr, wd, t) in zip(indices, params, opt._count_and_read(indices)):
            w = p.detach()
            target, inner = opt._split_mp(states[i]) if opt._mp(w) else (w, states[i])
            s = opt.prepare(lr=lr, wd=wd, t=t, index=i, dtype=target.dtype)
            x, new_inner = opt.direction(target, p.grad.to(target.dtype), inner, s)
            _tree.assign(inner, new_inner)
            todo.append((w, target, inner, s, x))
        votes = kv.vote([x for *_, x in todo]) if todo else []
        for (w, target, inner, s, _), v in zip(todo, votes):
            target.copy_(opt.apply_vote(target, v.to(target.dtype), s, inner))
            if target is not w:
                w.copy_(target)
