"""SGLD: stochastic gradient Langevin dynamics (MXNet ``sgld``)."""
from __future__ import annotations

import functools
import math

import torch

from ._numerics import mx_scalar
from .base import Optimizer
from .registry import register


@register
class SGLD(Optimizer):
    r"""Stochastic gradient Langevin dynamics (Welling & Teh, 2011): a half SGD step plus Gaussian noise.

    With :math:`G = \mathrm{clip}(rg\cdot g)` and :math:`\xi \sim \mathcal N(0, 1)` drawn per element:

    .. math::
        w &\leftarrow w - \tfrac{lr}{2}\,(G + wd\cdot w) \\
        w &\leftarrow w + \sqrt{lr}\;\xi

    so the noise has variance :math:`lr`. The noise is drawn by :meth:`_noise` (once per update, after
    the drift step, as MXNet), from ``generator`` when given, else from torch's default generator of
    the weight's device (reproducible with ``torch.manual_seed``). MXNet draws from its own global
    RNG, so its noise values cannot be reproduced; only their distribution is the same.

    State: None; multi-precision ``(w32, None)`` (the noise is then drawn in float32).

    torch.optim has no SGLD.

    Parameters
    ----------
    generator : torch.Generator, optional
        The source of the noise. Pickling the optimizer keeps it (with its state); the safe dump of
        ``Updater.get_states(dump_optimizer=True)`` does not, and a reloaded optimizer draws from
        torch's default generator.
    **kwargs : the :class:`Optimizer` arguments (``learning_rate`` defaults to 0.01).
    """

    capabilities = frozenset({"multi_precision", "stochastic"})

    def __init__(self, generator=None, **kwargs):
        super().__init__(**kwargs)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator={generator!r} is invalid: expected a torch.Generator or None")
        self.generator = generator

    def create_state(self, index, weight):
        return None

    def _noise(self, weight, lr):
        r"""``sqrt(lr) * N(0, 1)`` with the weight's shape, dtype and device."""
        if lr < 0:
            raise ValueError(f"lr={lr!r} is invalid for SGLD: the noise variance lr must be >= 0")
        gen = self.generator
        device = gen.device if gen is not None else weight.device
        xi = torch.randn(weight.shape, dtype=weight.dtype, device=device, generator=gen)
        return math.sqrt(lr) * xi.to(weight.device)

    def rule(self, w, g, state, *, lr, wd, t, index):
        D = functools.partial(mx_scalar, dtype=w.dtype)  # scalars as MXNet's NDArray ops see them
        G = self._clip(g * D(self.rescale_grad))
        w = w + D(-lr / 2) * (G + D(wd) * w)
        return w + self._noise(w, lr), None
