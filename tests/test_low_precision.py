"""fp16/bf16 weights without multi_precision: every rule stays finite and steps as it does in float64.

Spec-driven: every optimizer, its default options and each option variant. Each update of a low-precision
weight is compared with the same rule run in float64 on float64 copies of the same weight, state, gradient
and optimizer (LBSGD's accumulated gradients live there): one step from identical starting points, so that
rounding does not compound over the run. A rule whose bias corrections or schedules collapse when rounded
to the weight dtype (bf16(0.999) is 1, so ``1 - beta2^t`` is 0) gives non-finite weights or a wrong step
here (``optzoo.optimizer._numerics``, item 5).
"""
import copy

import pytest
import torch

import optzoo
import optzoo.torch as ot
from optzoo.optimizer._tree import leaves
from specs import SPECS

LOW = [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16")]
STEPS = 20
#: Storing the result costs half an ulp; a rule that computes in the weight dtype (MXNet's way, kept where
#: nothing collapses) a few more, of the terms of the step (measured: at most 1.7)
ULPS = 4


def variant_params():
    """Each spec's default options, then its variants."""
    return [pytest.param(s, v, id=f"{s.name}-{i}") for s in SPECS
            for i, v in enumerate([{}] + [v for v in s.variants if v])]


def create(spec, variant):
    opt = optzoo.optimizer.create(spec.name, **variant)
    if "stochastic" in spec.flags:  # compare the drift: no noise draw gives the same numbers in two dtypes
        opt._noise = lambda w, lr: torch.zeros_like(w)
    return opt


def widened(x):
    """A deep copy of an optimizer (or of what it holds) with its tensors in float64."""
    if isinstance(x, torch.Tensor):
        return x.double() if x.is_floating_point() else x
    if isinstance(x, dict):
        return {k: widened(v) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(widened(v) for v in x)
    if isinstance(x, optzoo.optimizer.Optimizer):
        x = copy.deepcopy(x)
        x.__dict__.update(widened(x.__dict__))
    return x


def assert_close_step(what, before, low, ref, dtype):
    """``low`` (after one step in ``dtype``) within ULPS of ``ref`` (the float64 step from the same ``before``),
    relative to the value and the step. Where the two steps point opposite ways, only their sizes are
    compared: a rule that steps by a sign (Signum) flips it where its argument cancels within rounding."""
    info = torch.finfo(dtype)
    low, finite = low.double(), torch.isfinite(ref)  # Adamax's 0/0 where a gradient is 0 is the rule's own
    assert torch.isfinite(low[finite]).all(), f"{what}: not finite in {dtype}, finite in float64"
    d_low, d_ref = low - before, ref - before
    err = torch.where(d_low * d_ref < 0, (d_low.abs() - d_ref.abs()).abs(), (low - ref).abs())
    err = torch.where(finite, err, 0.0)
    tol = ULPS * info.eps * (before.abs() + d_ref.abs()) + ULPS * info.eps * info.tiny  # subnormals: their ulp
    worst = int((err - tol).argmax())
    assert (err <= tol).all(), (f"{what}: {low.flatten()[worst].item()!r} in {dtype}, {ref.flatten()[worst].item()!r} "
                                f"in float64, from {before.flatten()[worst].item()!r}")


#: gradients of size 1, and of size 1e-2, where (1 - beta2) G^2 underflows fp16 (to 0 for |G| < 0.0077):
#: then an epsilon rounded to fp16 (1e-8 is 0) no longer keeps Adam's denominator from 0
SCALES = [pytest.param(1.0, id="g1"), pytest.param(1e-2, id="g1e-2")]


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("spec,variant", variant_params())
def test_low_precision_step_is_the_float64_step(spec, variant, dtype, scale):
    gen = torch.Generator().manual_seed(0)
    low = create(spec, variant)
    ws = [torch.randn(s, generator=gen).to(dtype) for s in spec.shapes]
    states = [low.create_state(i, w) for i, w in enumerate(ws)]
    for step in range(STEPS):
        for i, w in enumerate(ws):
            g = (scale * torch.randn(w.shape, generator=gen)).to(dtype)
            ref, w64 = widened(low), w.double()
            state64 = ref.create_state(i, w64)  # the float64 weight's layout (fp32 states stay fp32)
            for x64, x in zip(leaves(state64), leaves(states[i])):
                x64.copy_(x)
            before = [w64.clone()] + [x.double() for x in leaves(states[i])]
            low.update(i, w, g, states[i])
            ref.update(i, w64, g.double(), state64)
            assert w.dtype == dtype
            names = ["weight"] + [f"state {k}" for k in range(len(before) - 1)]
            for name, b, x, x64 in zip(names, before, [w] + leaves(states[i]), [w64] + leaves(state64)):
                assert_close_step(f"step {step}, index {i}, {name}", b, x, x64.double(), dtype)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("fused", [False, None], ids=["reference", "fast"])
@pytest.mark.parametrize("spec", [pytest.param(s, id=s.name) for s in SPECS])
@pytest.mark.filterwarnings("ignore:Accumulating with")
def test_torch_face_keeps_low_precision_weights_finite(spec, fused, dtype):
    gen = torch.Generator().manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in spec.shapes]
    opt = ot.create(spec.name, params, fused=fused)
    for _ in range(STEPS):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(dtype)
        opt.step()
    for p in params:
        assert p.dtype == dtype and torch.isfinite(p).all()
        assert all(torch.isfinite(x).all() for x in tensors(opt.state[p]) if x.is_floating_point())


def tensors(x):
    """The tensors in a torch.optim state entry (dicts, tuples, numbers)."""
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, dict):
        x = list(x.values())
    return [t for y in x for t in tensors(y)] if isinstance(x, (tuple, list)) else []


@pytest.mark.parametrize("dtype", LOW)
def test_accumulating_in_low_precision_warns_once_per_state_made(dtype):
    """MXNet's warning (fp16/bf16 weights without multi_precision) comes once for each state made, as MXNet's
    ``create_state_multi_precision`` gives it: not again from the executor's probes of the state's layout."""
    params = [torch.nn.Parameter(torch.randn(8).to(dtype)) for _ in range(3)]
    opt = ot.SGD(params, momentum=0.9)
    with pytest.warns(UserWarning, match="Accumulating with") as record:
        for _ in range(2):
            for p in params:
                p.grad = torch.randn(8).to(dtype)
            opt.step()
    assert len([w for w in record if "Accumulating with" in str(w.message)]) == len(params)
    mx = optzoo.optimizer.create("sgd", momentum=0.9)
    with pytest.warns(UserWarning, match="Accumulating with"):
        mx.create_state_multi_precision(0, torch.zeros(4, dtype=dtype))
