"""1-bit sign packing and the majority vote of signSGD with majority vote (Bernstein et al., 2019).

Each worker sends one bit per element: bit ``k`` of byte ``j`` is 1 when element ``8j + k`` is
:math:`\\ge 0`. Zero is sent as +1, as Bernstein et al. do (a second bit for zero would double the
traffic for a case that is rare in floating point). The vote of :math:`N` workers is

.. math:: v = \\mathrm{sign}\\Big(\\sum_{r=1}^{N} s_r\\Big),\\qquad s_r \\in \\{-1, +1\\},

which is 0 on a tie (possible for an even :math:`N`): the element does not move.
"""
from __future__ import annotations

import torch

__all__ = ["packed_size", "pack_signs", "unpack_signs", "vote"]

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
