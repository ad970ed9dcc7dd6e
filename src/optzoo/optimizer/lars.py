"""LARS: layer-wise adaptive rate scaling on top of SGD (MXNet ``lars``)."""
from __future__ import annotations

import itertools
import operator

import torch

from .._checks import check_bool, check_nonnegative, check_unit_interval
from ._numerics import in_dtype, mx_float, mx_param, norm_of
from .base import LOW_PRECISION, Optimizer, _checked_mults
from .registry import register

#: Parameters whose name ends like this keep the plain learning rate (biases, BatchNorm gamma/beta).
_NO_LARS = ("gamma", "beta", "bias")
_SCALED = {True: 0.0, False: 1.0}  # whether a name ends in _NO_LARS -> the kernel's ``scaled``
_DTYPE = operator.attrgetter("dtype")


@register
class LARS(Optimizer):
    r"""LARS (You et al., 2017): SGD whose learning rate is rescaled per parameter by its trust ratio.

    With :math:`G = \mathrm{clip}(rg\cdot g)`, L2 norms taken in float32:

    .. math::
        \lambda &= \frac{\eta\,\lVert w\rVert}{rg\,\lVert g\rVert + wd\,\lVert w\rVert + eps}
                   \ \text{ if } \lVert w\rVert > 0 \text{ and } \lVert g\rVert > 0,
                   \text{ else } 1 \\
        lr' &= \lambda\cdot lr \\
        \mu' &= \mu\cdot lr_{cur}/lr_{last}\ \text{ if momentum\_correction and } lr_{last} \ne 0,
                \text{ else } \mu \\
        \mu = 0:\quad & w \leftarrow (1 - lr'\,wd)\,w - lr'\,G \\
        \mu > 0:\quad & mom \leftarrow \mu'\,mom - lr'\,wd\cdot w - lr'\,G,\qquad w \leftarrow w + mom

    :math:`lr_{cur}` and :math:`lr_{last}` are the *global* learning rates (scheduler or ``lr``, before
    multipliers) of this ``update`` call and of the previous one (``cur_lr`` / ``last_lr``; on the first
    call both are the current one). The correction (Goyal et al., 2017) keeps the lr-scaled buffer
    consistent when a scheduler changes the learning rate. As in MXNet, the pair moves once per
    ``update`` call, and every index of a list call gets the same :math:`\mu'` (a list whose indices'
    update counts differ is read index by index, see :meth:`Optimizer.update`). MXNet's Updater (and so
    its Trainer) hands LARS lists of up to ``aggregate_num = 4`` indices per call: of 6 parameters
    stepped together, indices 0-3 get the corrected :math:`\mu'` and indices 4-5, in the step's second
    call, :math:`lr_{last} = lr_{cur}`, i.e. :math:`\mu`. ``get_updater`` cuts lists the same way.

    Parameters whose name (``param_idx2name[index]``, else ``str(index)``) ends in ``gamma``, ``beta``
    or ``bias`` get :math:`\lambda = 1`. With ``param_idx2name``, only names ending in ``_weight``
    keep weight decay (MXNet's LARS rule; other optimizers also keep ``_gamma``).

    optzoo follows MXNet's aggregated path, the one its Updater takes: the squared norms are
    ``multi_sum_sq``'s (fp32, summed in order; where that sum underflows or overflows, as for ~1e-25 or ~1e20 values, the norm comes from fp64 squares: :func:`~._numerics.norm_of`), :math:`lr'` is ``multi_lars``'s fp32
    :math:`lr\cdot\eta\cdot\lVert w\rVert/(\lVert g\rVert\,rg + wd\,\lVert w\rVert + eps)`, and the SGD
    step uses the fp32 :math:`lr'` and ``wd`` (bit-exact for fp32; for fp64 the norms are within an fp32
    ulp or so). MXNet's single-tensor path (a scalar index) takes :math:`\lVert rg\cdot g\rVert` in double
    instead, the same value up to rounding. Under multi-precision MXNet squares the *fp16* weight and
    gradient in fp16 before summing, which moves :math:`\lambda` by ~2e-4 relative; optzoo uses the
    fp32 master copy.

    State: as :class:`SGD`, ``mom`` or None when ``momentum == 0``; multi-precision ``(mom, w32)``.

    Row-sparse gradients take MXNet's non-aggregated path (``_get_lars``): :math:`\lambda` from the fp32 norms
    of the *whole* weight (the fp16 one under multi-precision) and of :math:`rg\cdot g`'s rows, computed in
    double, :math:`lr' = \lambda\cdot lr` rounded to fp32 once; then SGD's row-sparse step with :math:`lr'` and
    :math:`\mu'`: lazy (``lazy_update``, only the gradient's rows of ``w`` and ``mom``) or standard, and
    standard under multi-precision (``mp_sgd(_mom)_update`` has no sparse kernel). MXNet's ``norm`` sums
    scaled squares where optzoo sums plain fp32 squares: :math:`\lambda` may differ in its last bit.

    torch.optim has no LARS.

    Parameters
    ----------
    momentum : float in [0, 1), default 0
    lazy_update : bool, default True (only matters for row-sparse gradients)
    eta : float >= 0, default 0.001
        The LARS coefficient :math:`\eta`.
    eps : float >= 0, default 0
    momentum_correction : bool, default True
    **kwargs : the :class:`Optimizer` arguments (``learning_rate`` defaults to 0.01).
    """

    state_names = ("mom",)  # the state's tensors, as the docstring names them

    capabilities = frozenset({"multi_precision", "aggregated"})
    _mp_master_first = False
    aggregate_num = 4
    _counts_call_at_once = True  # MXNet's LARS._update_impl: one count of the call, one lr read
    _prepare_advances = True   # prepare takes each index's lr pair (and its exclusion by name)
    _step_vars = Optimizer._step_vars + ("last_lr", "cur_lr")
    _reads_per_index = False   # a list with equal counts is read whole, as MXNet's one read (see _get_lrs)

    _segment_kernel = True  # per-tensor norms: packed parameters run as rows of equal-sized parameters

    def __init__(self, momentum=0.0, lazy_update=True, eta=0.001, eps=0, momentum_correction=True, **kwargs):
        momentum = check_unit_interval("momentum", momentum)
        lazy_update = check_bool("lazy_update", lazy_update)
        eta = check_nonnegative("eta", eta)
        eps = check_nonnegative("eps", eps)
        momentum_correction = check_bool("momentum_correction", momentum_correction)
        super().__init__(**kwargs)
        self.momentum = momentum
        self.lazy_update = lazy_update
        self.eta, self.eps = eta, eps
        self.momentum_correction = momentum_correction
        self.last_lr = None
        self.cur_lr = None
        self._lr_pairs = {}  # index -> the (last_lr, cur_lr) of its latest read, until prepare takes it

    def set_wd_mult(self, args_wd_mult):
        """As :meth:`Optimizer.set_wd_mult`, but only names ending in ``_weight`` keep weight decay."""
        mults = _checked_mults("wd_mult", args_wd_mult)
        self.wd_mult = {name: 0.0 for name in self.idx2name.values() if not name.endswith("_weight")}
        self.wd_mult.update(mults)

    def _get_lrs(self, indices):
        # MXNet's LARS reads the global lr once per update call, after counting the whole list:
        # last_lr <- cur_lr (the lr itself the first time), cur_lr <- lr, and the call's kernel corrects
        # the momentum of every index by cur_lr / last_lr. A list read is that one read: every index
        # gets the pair, and keeps it until prepare takes it (the fast path reads a list whole before
        # preparing any index).
        lr = self.lr_scheduler(self.num_update) if self.lr_scheduler is not None else self.lr
        if indices:
            self.last_lr = lr if self.cur_lr is None else self.cur_lr
            self.cur_lr = lr
            self._lr_pairs.update(dict.fromkeys(indices, (self.last_lr, lr)))
        return self._multiplied(lr, indices, "lr_mult", self.lr_mult)

    def _reads_for(self, indices, chunks):
        # Without a scheduler every call reads the same lr, so that the calls after the first all get the pair
        # (lr, lr), their indices each counted once: read as one call (the same counts, reads and lr pairs,
        # without ~4 us of bookkeeping per call of aggregate_num indices)
        if chunks is not None and len(chunks) > 2 and self.lr_scheduler is None and \
                len(set(indices)) == len(indices):
            chunks = [chunks[0], [k for chunk in chunks[1:] for k in chunk]]
        return super()._reads_for(indices, chunks)

    def create_state(self, index, weight):
        return torch.zeros_like(weight) if self.momentum != 0.0 else None

    def prepare(self, *, lr, wd, t, index, dtype):
        pair = self._lr_pairs.pop(index, (self.last_lr, self.cur_lr))
        scaled = 0.0 if self.idx2name.get(index, str(index)).endswith(_NO_LARS) else 1.0
        return self._prepare_key(((lr, wd, t), dtype, pair, scaled))

    def _prepare_all(self, indices, weights, reads):
        """``prepare`` for every index of a list, in index order, with the same values: each index's lr pair and
        exclusion by name in C-level maps, the scalars once per distinct key (one tuple for the indices that
        share it)."""
        pairs = list(map(self._lr_pairs.pop, indices, itertools.repeat((self.last_lr, self.cur_lr))))
        names = map(self.idx2name.get, indices, map(str, indices))
        scaled = map(_SCALED.__getitem__, map(str.endswith, names, itertools.repeat(_NO_LARS)))
        keys = list(zip(reads, map(_DTYPE, weights), pairs, scaled))
        if keys and keys.count(keys[0]) == len(keys):  # one key for every index (compared in C; tuples hash slowly)
            return [self._prepare_key(keys[0])] * len(keys)
        table = {key: self._prepare_key(key) for key in dict.fromkeys(keys)}
        return list(map(table.__getitem__, keys))

    def _prepare_key(self, key):
        """The scalars of ``((lr, wd, t), dtype, (last_lr, cur_lr), scaled)``, remembered (``_memo``)."""
        (lr, wd, _), dtype, (last_lr, cur_lr), scaled = key
        memo = (lr, wd, last_lr, cur_lr, scaled, dtype, self.momentum, self.momentum_correction, self.eta, self.eps,
                self.rescale_grad)
        return self._memo(memo, lambda: self._prepare(lr, wd, last_lr, cur_lr, scaled, dtype))

    def _momentum(self, last_lr, cur_lr):
        """:math:`\\mu'`, the corrected momentum of a call whose global lr pair is ``(last_lr, cur_lr)``."""
        if self.momentum_correction and last_lr != 0:
            return self.momentum * (cur_lr / last_lr)
        return self.momentum

    def _prepare(self, lr, wd, last_lr, cur_lr, scaled, dtype):
        mu = self._momentum(last_lr, cur_lr)
        # MXNet hands lr and wd to multi_lars and the SGD kernel as fp32 arrays; multi_lars is fp32 math
        lr, wd = in_dtype(lr, torch.float32), in_dtype(wd, torch.float32)
        eta, eps, rg32 = mx_float(self.eta), mx_float(self.eps), mx_float(self.rescale_grad)
        return (mx_param(mu, dtype), lr, wd, in_dtype(lr * eta, torch.float32), eps, rg32,
                mx_param(self.rescale_grad, dtype), scaled)

    # ------------------------------------------------------------------ row-sparse gradients
    def sparse_mode(self, index, multi_precision):
        return "lazy" if self.lazy_update and not multi_precision else "standard"

    def sparse_lr(self, index, weight, values, lr, wd):
        # MXNet's _get_lars: fp32 norms (values scaled by rg in fp32), the ratio in double, then lr * lars. The
        # whole weight's norm is a reduction over the table (as MXNet's): no table-sized temporary (a lazy step
        # allocates only its rows), so not norm_of's sequential sums, whose order MXNet's norm does not keep either
        if self.idx2name.get(index, str(index)).endswith(_NO_LARS):
            return lr
        nw = float(torch.linalg.vector_norm(weight, dtype=torch.float32))
        ng = float(norm_of(values.to(torch.float32) * mx_float(self.rescale_grad)))
        return lr * (self.eta * nw / (ng + wd * nw + self.eps)) if nw > 0.0 and ng > 0.0 else lr

    def lazy_rule(self, w, g, mom, *, lr, wd, t, index):
        """SGD's step with ``lr`` (already :math:`lr'`) as MXNet's sgd_update / sgd_mom_update compute it, on the
        gradient's rows (lazy) or on the densified gradient (standard; the same rounding)."""
        mu = mx_param(self._momentum(*self._lr_pairs.pop(index, (self.last_lr, self.cur_lr))), w.dtype)
        lr, wd, rg = (mx_param(x, w.dtype) for x in (lr, wd, self.rescale_grad))
        step = lr * self._clip(rg * g) if self.clip_gradient else in_dtype(lr * rg, w.dtype) * g
        if mom is None:  # sgd_update: (1 - lr*wd)*w - lr*G
            return (1 - in_dtype(lr * wd, w.dtype)) * w - step, None
        d = mu * mom - in_dtype(lr * wd, w.dtype) * w - step  # sgd_mom_update: mom <- mu*mom - lr*wd*w - lr*G
        return w + d, d

    standard_rule = lazy_rule

    def kernel(self, w, g, mom, s, seg=None):
        mu, lr, wd, lr_eta, eps, rg32, rg, scaled = s
        lr, wd, lr_eta, eps, rg32 = (_f32(x) for x in (lr, wd, lr_eta, eps, rg32))
        # multi_lars: lr' from multi_sum_sq's fp32 squared norms, all in fp32 (lr itself if excluded)
        nw, ng = norm_of(w, seg), norm_of(g, seg)  # fp32 (MXNet's, unless the fp32 sums under/overflow)
        lars_lr = lr_eta * nw / (ng * rg32 + wd * nw + eps)
        lr = torch.where((nw > 0) & (ng > 0) & (scaled > 0), lars_lr, lr)
        # preloaded_multi_sgd(_mom)_update: SGD's kernel, except that lr * wd is an fp32 product
        lr_wd = (lr * wd).to(torch.float32)
        # an fp32 scalar meets a float16/bfloat16 tensor in fp32 (as a Python scalar would), rounded once
        wd_w = (lr_wd * w.float()).to(w.dtype) if w.dtype in LOW_PRECISION else lr_wd * w
        lr = lr.to(w.dtype)
        if self.clip_gradient:
            step = lr * self._clip(rg * g)
        else:  # (lr * rg) * g, the product rounded once to the weight dtype
            step = (lr.double() * rg).to(w.dtype) * g
        d = (0.0 if mom is None else mu * mom) - wd_w - step
        return w + d, (None if mom is None else d)


def _f32(x):
    """An fp32 parameter that the fast path hands over as an fp64 tensor (fp64 weights), back in fp32 so that
    multi_lars's arithmetic stays fp32."""
    return x.to(torch.float32) if isinstance(x, torch.Tensor) and x.dtype == torch.float64 else x
