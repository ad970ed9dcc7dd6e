"""FTRL-Proximal (MXNet ``ftrl``)."""
from __future__ import annotations

import torch

from .._checks import check_nonnegative
from .base import Optimizer
from .registry import register


@register
class Ftrl(Optimizer):
    r"""FTRL-Proximal (McMahan et al., "Ad Click Prediction: a View from the Trenches", KDD 2013).

    With :math:`G = \mathrm{clip}(rg\cdot g)` (weight decay is neither added to :math:`G` nor clipped):

    .. math::
        z &\leftarrow z + G - \left(\sqrt{n + G^2} - \sqrt{n}\right) w / lr \\
        n &\leftarrow n + G^2 \\
        w &\leftarrow \frac{\mathrm{sign}(z)\,\lambda_1 - z}{(\beta + \sqrt{n})/lr + wd}
              \cdot \mathbb{1}\left[\,|z| > \lambda_1\right]

    so :math:`\lambda_1` is the L1 strength (coordinates with :math:`|z| \le \lambda_1` are exactly 0)
    and ``wd`` the L2 strength (the paper's :math:`\lambda_2`), both entering in closed form, not as
    gradients.

    State: ``(z, n)``, always **fp32** (MXNet creates it with no dtype); multi-precision
    ``(w32, (z, n))``. Other weight dtypes compute in torch's promoted dtype, the states rounded to fp32
    when stored (MXNet 1.9.1 raises on such mixed dtypes: "Incompatible attr ... expected float64, got
    float32").

    ``learning_rate`` is kept as MXNet keeps it: it is *not* handed to the base class, so with an
    ``lr_scheduler`` the scheduler's ``base_lr`` is left alone (no overwrite, no warning) and the
    scheduler alone sets :math:`lr`; without one, :math:`lr` is ``learning_rate`` (default 0.1).

    torch.optim has no FTRL. Unlike the paper's per-coordinate rate :math:`\alpha/(\beta+\sqrt{n})`
    applied once, here the current :math:`lr` divides both the :math:`\sigma` term of :math:`z` and the
    denominator, so a changing learning rate (a scheduler) also rescales the whole accumulated solution.

    Parameters
    ----------
    lamda1 : float >= 0, default 0.01
        :math:`\lambda_1`, the L1 regularization strength.
    learning_rate : float >= 0, default 0.1
        :math:`lr` (the paper's :math:`\alpha`); unused when an ``lr_scheduler`` is given.
    beta : float >= 0, default 1
        :math:`\beta`, added to :math:`\sqrt{n}` in the per-coordinate rate.
    **kwargs : the :class:`Optimizer` arguments.
    """

    def __init__(self, lamda1=0.01, learning_rate=0.1, beta=1, **kwargs):
        check_nonnegative("learning_rate", learning_rate, allow_none=kwargs.get("lr_scheduler") is not None)
        self.lamda1 = check_nonnegative("lamda1", lamda1)
        self.beta = check_nonnegative("beta", beta)
        super().__init__(**kwargs)  # not learning_rate: MXNet leaves a scheduler's base_lr untouched
        self.lr = learning_rate

    def create_state(self, index, weight):
        f32 = torch.float32
        return (torch.zeros_like(weight, dtype=f32), torch.zeros_like(weight, dtype=f32))  # z, n

    def rule(self, w, g, state, *, lr, wd, t, index):
        z, n = state
        dtype = torch.promote_types(w.dtype, z.dtype)
        w, g = w.to(dtype), g.to(dtype)

        def param(x):  # an fp32 op parameter, as the kernel sees it in its dtype
            return torch.tensor(x, dtype=torch.float32).to(dtype)

        lr_, lamda1 = param(lr), param(self.lamda1)
        G = param(self.rescale_grad) * g
        if self.clip_gradient:
            c = float(param(self.clip_gradient))
            G = G.clamp(-c, c)
        G2 = G * G
        z = z + (G - (((n + G2).sqrt() - n.sqrt()) * w) / lr_)
        n = n + G2
        new_w = (z.sign() * lamda1 - z) / ((param(self.beta) + n.sqrt()) / lr_ + param(wd)) \
            * (z.abs() > lamda1).to(dtype)
        return new_w, (z, n)
