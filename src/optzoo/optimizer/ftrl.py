"""FTRL-Proximal (MXNet ``ftrl``)."""
from __future__ import annotations

import functools

import torch

from .._checks import check_bool, check_nonnegative
from ._numerics import mx_param, sqrt_rn
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

    Row-sparse gradients: standard by default, as MXNet 1.9.1 with a dense weight (its storage fallback: every
    row follows the rule with :math:`G = 0`, so rows never seen become 0 at the first update, and ``wd`` acts
    everywhere); ``lazy_update=True`` updates only the gradient's rows of :math:`w`, :math:`z` and :math:`n`,
    the numbers of MXNet's lazy kernel, which it runs only when the weight itself is row_sparse (what CTR
    models need; also under multi-precision, which MXNet does not offer lazily).

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
    lazy_update : bool, default False
        Row-sparse gradients only: update only the gradient's rows of :math:`w`, :math:`z` and :math:`n`
        (see "Row-sparse gradients" above). Not an MXNet argument (optzoo's opt-in).
    **kwargs : the :class:`Optimizer` arguments.
    """

    state_names = ("z", "n")  # the state's tensors, as the docstring names them

    def __init__(self, lamda1=0.01, learning_rate=0.1, beta=1, lazy_update=False, **kwargs):
        lazy_update = check_bool("lazy_update", lazy_update)
        learning_rate = check_nonnegative("learning_rate", learning_rate,
                                          allow_none=kwargs.get("lr_scheduler") is not None)
        lamda1 = check_nonnegative("lamda1", lamda1)
        beta = check_nonnegative("beta", beta)
        super().__init__(**kwargs)  # not learning_rate: MXNet leaves a scheduler's base_lr untouched
        self.lamda1, self.beta = lamda1, beta
        self.lr = learning_rate
        self.lazy_update = lazy_update

    def sparse_mode(self, index, multi_precision):
        return "lazy" if self.lazy_update else "standard"

    def create_state(self, index, weight):
        f32 = torch.float32
        return (torch.zeros_like(weight, dtype=f32), torch.zeros_like(weight, dtype=f32))  # z, n

    def prepare(self, *, lr, wd, t, index, dtype):
        P = functools.partial(mx_param, dtype=torch.promote_types(dtype, torch.float32))  # see "State"
        return P(lr), P(wd), P(self.lamda1), P(self.beta), P(self.rescale_grad)  # ftrl_update's parameters

    def kernel(self, w, g, state, s, seg=None):
        lr, wd, lamda1, beta, rg = s
        z, n = state
        dtype = torch.promote_types(w.dtype, z.dtype)  # see "State" in the docstring
        w, g = w.to(dtype), g.to(dtype)
        G = self._clip(g * rg)
        G2 = G * G
        z = z + (G - ((sqrt_rn(n + G2) - sqrt_rn(n)) * w) / lr)
        n = n + G2
        new_w = (z.sign() * lamda1 - z) / ((beta + sqrt_rn(n)) / lr + wd) * (z.abs() > lamda1).to(dtype)
        return new_w, (z, n)
