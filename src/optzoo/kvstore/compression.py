"""MXNet 1.9.1's 2-bit gradient compression with error feedback (reference §6, "Gradient compression").

Each worker keeps a residual :math:`r` (fp32, per parameter, starting at 0) and, per element, with
threshold :math:`\\theta`:

.. math::
    r \\leftarrow r + g;\\quad
    q = \\begin{cases} +\\theta & r \\ge \\theta \\\\ -\\theta & r \\le -\\theta \\\\ 0 & \\text{otherwise}\\end{cases};
    \\quad r \\leftarrow r - q

and sends :math:`q` as a 2-bit code, 16 codes per 32-bit word, in MXNet's layout: element ``j`` of a
word lies in byte ``j // 4`` at bits ``7-2(j%4)`` and ``6-2(j%4)``, code ``11`` for :math:`+\\theta`,
``10`` for :math:`-\\theta`, ``00`` for 0. The receivers decode and sum, as MXNet's server sums the
dequantised pushes. Gradients are compressed as the workers hold them (before ``rescale_grad``).
"""
from __future__ import annotations

import numbers

import torch

__all__ = ["TwoBit", "parse_compression_params", "packed_size", "quantize", "pack_2bit", "unpack_2bit"]

_POS = torch.tensor([0xC0, 0x30, 0x0C, 0x03], dtype=torch.uint8)
_NEG = torch.tensor([0x80, 0x20, 0x08, 0x02], dtype=torch.uint8)


def parse_compression_params(params) -> "TwoBit | None":
    """Check MXNet's ``compression_params`` (``{'type': '2bit', 'threshold': 0.5}``); None stays None."""
    if params is None:
        return None
    if not isinstance(params, dict):
        raise TypeError(f"compression_params={params!r} is invalid: expected a dict such as "
                        "{'type': '2bit', 'threshold': 0.5}")
    unknown = sorted(set(params) - {"type", "threshold"})
    if unknown:
        raise ValueError(f"compression_params has unknown key(s) {unknown}: expected 'type' and 'threshold'")
    if "type" not in params:
        raise ValueError("compression_params['type'] is missing: expected '2bit'")
    if params["type"] != "2bit":
        raise ValueError(f"compression_params['type']={params['type']!r} is invalid: MXNet 1.9.1 supports "
                         "only '2bit'")
    threshold = params.get("threshold", 0.5)
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not threshold > 0:
        raise ValueError(f"compression_params['threshold']={threshold!r} is invalid: expected a number > 0")
    return TwoBit(float(threshold))


def packed_size(n: int) -> int:
    """Bytes of ``n`` codes: :math:`4\\lceil n/16 \\rceil` (whole 32-bit words, as MXNet)."""
    return 4 * -(-n // 16)


def quantize(g: torch.Tensor, residual: torch.Tensor, threshold: float):
    """``(q, new_residual)``: the codes (int8 -1, 0, +1) and the residual after sending; never mutates."""
    r = residual + g.to(residual.dtype)
    q = (r >= threshold).to(torch.int8) - (r <= -threshold).to(torch.int8)
    return q, r - q.to(r.dtype) * threshold


def pack_2bit(q: torch.Tensor) -> torch.Tensor:
    """Codes (int8 -1, 0, +1) as ``packed_size(n)`` uint8 bytes in MXNet's layout."""
    q = q.reshape(-1)
    pad = packed_size(q.numel()) * 4 - q.numel()
    if pad:
        q = torch.cat([q, q.new_zeros(pad)])
    q = q.view(-1, 4)
    pos, neg = _POS.to(q.device), _NEG.to(q.device)
    return ((q > 0).to(torch.uint8) * pos + (q < 0).to(torch.uint8) * neg).sum(1, dtype=torch.uint8)


def unpack_2bit(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Codes (int8 -1, 0, +1) of the first ``n`` elements of ``pack_2bit`` output (any leading dims)."""
    pos, neg = _POS.to(packed.device), _NEG.to(packed.device)
    b = packed.unsqueeze(-1)
    code = (b & pos) == pos
    minus = ((b & pos) == neg)
    q = code.to(torch.int8) - minus.to(torch.int8)
    return q.reshape(*packed.shape[:-1], -1)[..., :n]


class TwoBit:
    """The parsed ``{'type': '2bit', 'threshold': threshold}`` setting."""

    type = "2bit"

    def __init__(self, threshold: float = 0.5):
        self.threshold = threshold

    def __repr__(self):
        return f"TwoBit(threshold={self.threshold})"
