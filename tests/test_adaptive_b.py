"""Ftrl, FTML, LAMB and GroupAdaGrad: what the MXNet golden fixtures cannot check.

References are the docstring equations written out again here in float64 on plain tensors.
"""
import math
import warnings

import pytest
import torch

from optzoo import lr_scheduler
from optzoo.optimizer import FTML, LAMB, Ftrl, GroupAdaGrad, create, get_record

F64 = torch.float64


def randn(*shape, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=F64).to(dtype)


# ------------------------------------------------------------------------------------------ float64 references
def lamb_ref(w, grads, *, lr, wd=0.0, b1=0.9, b2=0.999, eps=1e-6, rg=1.0, bias_correction=True, lb=None, ub=None):
    w, m, v = w.to(F64), torch.zeros_like(w, dtype=F64), torch.zeros_like(w, dtype=F64)
    for t, g in enumerate(grads, start=1):
        G = rg * g.to(F64)
        m = b1 * m + (1 - b1) * G
        v = b2 * v + (1 - b2) * G * G
        if bias_correction:
            u = (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + eps) + wd * w
        else:
            u = m / (v.sqrt() + eps) + wd * w
        r1, r2 = w.norm().item(), u.norm().item()
        if lb:
            r1 = max(r1, lb)
        if ub:
            r1 = min(r1, ub)
        ratio = 1.0 if r1 == 0 or r2 == 0 else r1 / r2
        w = w - lr * ratio * u
    return w


def ftrl_ref(w, grads, *, lr, lamda1, beta, wd=0.0):
    w, z, n = w.to(F64), torch.zeros_like(w, dtype=F64), torch.zeros_like(w, dtype=F64)
    for g in grads:
        g = g.to(F64)
        z = z + g - ((n + g * g).sqrt() - n.sqrt()) * w / lr
        n = n + g * g
        w = (z.sign() * lamda1 - z) / ((beta + n.sqrt()) / lr + wd) * (z.abs() > lamda1)
    return w


def ftml_ref(w, grads, *, lr, wd=0.0, b1=0.6, b2=0.999, eps=1e-8):
    w = w.to(F64)
    d, v, z = (torch.zeros_like(w) for _ in range(3))
    for t, g in enumerate(grads, start=1):
        G = g.to(F64) + wd * w
        v = b2 * v + (1 - b2) * G * G
        d_t = (1 - b1 ** t) / lr * ((v / (1 - b2 ** t)).sqrt() + eps)
        z = b1 * z + (1 - b1) * G - (d_t - b1 * d) * w
        d = d_t
        w = -z / d_t
    return w


def group_adagrad_ref(w, grads, *, lr, eps):
    w = w.to(F64)
    h = torch.zeros(w.shape[0], 1, dtype=F64)
    for g in grads:
        g = g.to(F64)
        h = h + (g * g).mean(dim=1, keepdim=True)
        w = w - lr * g / (h + eps).sqrt()
    return w


def run(opt, w, grads, index=0):
    state = opt.create_state_multi_precision(index, w)
    for g in grads:
        opt.update_multi_precision(index, w, g, state)
    return state


# ------------------------------------------------------------------------------------------------------- LAMB
def test_lamb_multi_precision_stores_and_uses_the_master_copy():
    """MXNet 1.9.1's single-tensor mp_lamb_update_phase2 never stores w32; optzoo does, and r1 = ||w32||."""
    w16 = randn(4, 6, seed=1, dtype=torch.float16)
    grads = [randn(4, 6, seed=10 + s, dtype=torch.float16) for s in range(8)]
    w0 = w16.to(torch.float32)
    kw = dict(learning_rate=0.05, wd=0.01)
    opt = LAMB(multi_precision=True, **kw)
    state = opt.create_state_multi_precision(0, w16)
    w32, (m, v) = state
    assert w32.dtype == m.dtype == v.dtype == torch.float32
    seen = []
    for g in grads:
        opt.update_multi_precision(0, w16, g, state)
        seen.append(w32.clone())
    # the master copy moves every step, and the fp16 weight is its rounding
    assert all(not torch.equal(a, b) for a, b in zip([w0] + seen, seen))
    assert torch.equal(w16, w32.to(torch.float16))
    # an fp32 run from the same start on the same (fp16-valued) gradients gives the master copy bit for bit
    w_fp32 = w0.clone()
    run(LAMB(**kw), w_fp32, [g.to(torch.float32) for g in grads])
    assert torch.equal(w32, w_fp32)
    # and both follow the equations (fp32 rounding only)
    ref = lamb_ref(w0, [g.to(torch.float32) for g in grads], lr=0.05, wd=0.01)
    torch.testing.assert_close(w32.to(F64), ref, rtol=1e-5, atol=1e-6)
    # the fp16 result is far from what a never-updated master copy (MXNet 1.9.1's bug) would give
    assert (w32 - w0).abs().max() > 0.1


@pytest.mark.parametrize("bias_correction", [True, False])
@pytest.mark.parametrize("bounds", [(None, None), (5.0, None), (None, 0.5), (0.1, 2.0), (0.0, 0.0)],
                         ids=["none", "lower-active", "upper-active", "both-inactive", "zero-means-off"])
def test_lamb_trust_ratio_bounds_follow_the_equations(bias_correction, bounds):
    lb, ub = bounds
    w = randn(3, 5, seed=2)  # ||w|| ~ 3.9: lower 5 and upper 0.5 both act, (0.1, 2.0) acts above
    grads = [randn(3, 5, seed=20 + s) for s in range(5)]
    kw = dict(learning_rate=0.02, wd=0.1, lower_bound=lb, upper_bound=ub, bias_correction=bias_correction)
    out = w.clone()
    run(LAMB(**kw), out, grads)
    ref = lamb_ref(w, grads, lr=0.02, wd=0.1, lb=lb, ub=ub, bias_correction=bias_correction)
    torch.testing.assert_close(out.to(F64), ref, rtol=1e-5, atol=1e-6)


def test_lamb_bounds_change_the_step_by_the_bounded_ratio():
    w = randn(3, 5, seed=3, dtype=F64)  # fp64: no cancellation in w - out
    g = randn(3, 5, seed=4, dtype=F64)
    r1 = w.norm().item()
    steps = {}
    for name, kw in {"free": {}, "lower": {"lower_bound": 2 * r1}, "upper": {"upper_bound": r1 / 4}}.items():
        out = w.clone()
        run(LAMB(learning_rate=0.01, **kw), out, [g])
        steps[name] = w - out
    # r1 and r2 are fp32 values, as in MXNet's kernels
    torch.testing.assert_close(steps["lower"], 2 * steps["free"], rtol=1e-6, atol=0)
    torch.testing.assert_close(steps["upper"], steps["free"] / 4, rtol=1e-6, atol=0)


def test_lamb_ratio_is_one_for_zero_weight_or_zero_direction():
    # zero weight: r1 = 0, the step is lr * u (u = m_hat / (sqrt(v_hat) + eps), ~sign(g) on the first step)
    g = randn(2, 3, seed=5)
    w = torch.zeros(2, 3)
    run(LAMB(learning_rate=0.1), w, [g])
    ref = lamb_ref(torch.zeros(2, 3), [g], lr=0.1)
    torch.testing.assert_close(w.to(F64), ref, rtol=1e-6, atol=1e-7)
    assert torch.allclose(w, -0.1 * g.sign(), atol=1e-5)
    # zero gradient and no weight decay: u = 0, r2 = 0, the weight does not move
    w = randn(2, 3, seed=6)
    before = w.clone()
    run(LAMB(learning_rate=0.1, lower_bound=1.0), w, [torch.zeros(2, 3)])
    assert torch.equal(w, before)


@pytest.mark.parametrize("name", ["lower_bound", "upper_bound"])
def test_lamb_rejects_negative_bounds(name):
    with pytest.raises(ValueError, match=f"{name}=-0.5"):
        LAMB(**{name: -0.5})


def test_lamb_registry_record():
    rec = get_record("lamb")
    assert {"aggregated", "multi_precision"} <= rec.capabilities
    assert LAMB().aggregate_num == 45


def test_lamb_list_call_updates_each_tensor_with_its_own_count():
    opt = LAMB(learning_rate=0.01)
    ws = [randn(3, 4, seed=7), randn(5, seed=8)]
    states = [opt.create_state(i, w) for i, w in enumerate(ws)]
    g0 = randn(3, 4, seed=9)
    opt.update(0, ws[0], g0, states[0])  # index 0 is one step ahead
    gs = [randn(3, 4, seed=11), randn(5, seed=12)]
    w_init = [randn(3, 4, seed=7), randn(5, seed=8)]
    opt.update([0, 1], ws, gs, states)
    torch.testing.assert_close(ws[0].to(F64), lamb_ref(w_init[0], [g0, gs[0]], lr=0.01), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ws[1].to(F64), lamb_ref(w_init[1], [gs[1]], lr=0.01), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------------- Ftrl
def test_ftrl_learning_rate_default_and_equations():
    opt = Ftrl(lamda1=1.0, beta=0.5, wd=0.02)
    assert opt.lr == 0.1 and opt.learning_rate == 0.1
    w = randn(4, 3, seed=13)
    grads = [randn(4, 3, seed=30 + s) for s in range(6)]
    out = w.clone()
    z, n = run(opt, out, grads)
    assert z.dtype == n.dtype == torch.float32
    ref = ftrl_ref(w, grads, lr=0.1, lamda1=1.0, beta=0.5, wd=0.02)
    torch.testing.assert_close(out.to(F64), ref, rtol=1e-5, atol=1e-6)
    # L1 zeroes exactly the same coordinates (some, not all)
    assert (out == 0).any() and (out != 0).any() and torch.equal(out == 0, ref == 0)


def test_ftrl_scheduler_base_lr_is_not_overwritten():
    sched = lr_scheduler.FactorScheduler(step=2, factor=0.5, base_lr=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the base class would warn when it overwrites base_lr
        opt = Ftrl(learning_rate=0.3, lr_scheduler=sched)
    assert sched.base_lr == 0.05
    assert opt.lr == 0.3 and opt.learning_rate == 0.05
    # the scheduler, not learning_rate, sets the rate of every step
    w = randn(3, 2, seed=14)
    g = randn(3, 2, seed=15)
    out = w.clone()
    run(opt, out, [g])
    torch.testing.assert_close(out.to(F64), ftrl_ref(w, [g], lr=0.05, lamda1=0.01, beta=1.0),
                               rtol=1e-5, atol=1e-7)
    # learning_rate may be None with a scheduler, as in MXNet
    Ftrl(learning_rate=None, lr_scheduler=lr_scheduler.FactorScheduler(step=2, base_lr=0.05))


@pytest.mark.parametrize("kwargs,needle", [({"learning_rate": -0.1}, "learning_rate=-0.1"),
                                           ({"learning_rate": None}, "learning_rate=None"),
                                           ({"lamda1": -1.0}, "lamda1=-1.0"),
                                           ({"beta": -0.5}, "beta=-0.5")])
def test_ftrl_rejects_bad_arguments(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        Ftrl(**kwargs)


def test_ftrl_float64_weight_keeps_fp32_state():
    """MXNet 1.9.1 raises on fp64 weights (fp32 states); optzoo computes in fp64, states stored as fp32."""
    w = randn(3, 3, seed=16, dtype=F64)
    grads = [randn(3, 3, seed=40 + s, dtype=F64) for s in range(3)]
    out = w.clone()
    z, n = run(Ftrl(), out, grads)
    assert out.dtype == F64 and z.dtype == n.dtype == torch.float32
    torch.testing.assert_close(out, ftrl_ref(w, grads, lr=0.1, lamda1=0.01, beta=1.0), rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------------------- FTML
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (F64, 1e-9)])
def test_ftml_follows_the_equations(dtype, tol):
    w = randn(4, 5, seed=17, dtype=dtype)
    grads = [randn(4, 5, seed=50 + s, dtype=dtype) for s in range(10)]
    out = w.clone()
    d, v, z = run(FTML(learning_rate=0.02, beta1=0.7, beta2=0.99, wd=0.03), out, grads)
    assert d.dtype == v.dtype == z.dtype == dtype
    ref = ftml_ref(w, grads, lr=0.02, wd=0.03, b1=0.7, b2=0.99)
    torch.testing.assert_close(out.to(F64), ref, rtol=tol, atol=tol)


def test_ftml_scalars_are_rounded_to_the_kernel_dtype():
    """MXNet casts beta1 to fp32 before the fp64 kernel: (1 - beta1) is 1 - fp32(0.7), not 1 - 0.7."""
    w = randn(6, seed=18, dtype=F64)
    g = randn(6, seed=19, dtype=F64)
    out = w.clone()
    d, v, z = run(FTML(learning_rate=0.02, beta1=0.7), out, [g])
    b1 = float(torch.tensor(0.7, dtype=torch.float32))
    b2 = float(torch.tensor(0.999, dtype=torch.float32))
    lr = float(torch.tensor(0.02, dtype=torch.float32))
    v_ref = (1 - b2) * (g * g)
    d_ref = (1 - b1) / lr * ((v_ref / (1 - b2)).sqrt() + 1e-8)
    torch.testing.assert_close(v, v_ref, rtol=1e-15, atol=0)
    torch.testing.assert_close(d, d_ref, rtol=1e-15, atol=0)
    assert not torch.allclose(d, (1 - 0.7) / 0.02 * ((v_ref / (1 - 0.999)).sqrt() + 1e-8), rtol=1e-9, atol=0)


# ----------------------------------------------------------------------------------------------- GroupAdaGrad
def test_group_adagrad_state_and_equations():
    opt = create("groupadagrad", learning_rate=0.1, eps=1e-3, clip_gradient=None)
    w = randn(5, 3, seed=21)
    grads = [randn(5, 3, seed=60 + s) for s in range(6)]
    out = w.clone()
    h = run(opt, out, grads)
    assert h.shape == (5, 1) and h.dtype == torch.float32
    torch.testing.assert_close(out.to(F64), group_adagrad_ref(w, grads, lr=0.1, eps=1e-3), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(6,), (2, 3, 4)])
def test_group_adagrad_rejects_non_2d_weights(shape):
    opt = GroupAdaGrad()
    w = torch.zeros(shape)
    with pytest.raises(ValueError, match=re_escape(f"shape {shape}")):
        opt.create_state(0, w)
    # a state made for another weight is rejected at update, naming the shape
    with pytest.raises(ValueError, match=re_escape(f"shape {shape}")):
        opt.update(0, w, torch.ones(shape), torch.zeros(3, 1))
    assert torch.equal(w, torch.zeros(shape))


def test_group_adagrad_rejects_weight_decay_at_construction():
    with pytest.raises(ValueError, match="wd=0.1"):
        GroupAdaGrad(wd=0.1)
    GroupAdaGrad(wd=0.0)


def test_group_adagrad_rejects_nonzero_effective_wd_before_modifying_anything():
    opt = GroupAdaGrad(learning_rate=0.1)
    ws = [randn(3, 4, seed=22), randn(2, 4, seed=23)]
    states = [opt.create_state(i, w) for i, w in enumerate(ws)]
    gs = [randn(3, 4, seed=24), randn(2, 4, seed=25)]
    opt.wd = 0.5  # changed after construction; index 1 keeps decay, index 0 has wd_mult 0
    opt.set_wd_mult({0: 0.0})
    before = [w.clone() for w in ws] + [s.clone() for s in states]
    with pytest.raises(ValueError, match="wd for index 1 is 0.5"):
        opt.update([0, 1], ws, gs, states)
    assert all(torch.equal(a, b) for a, b in zip(before, ws + states))
    assert opt.num_update == 0
    opt.update(0, ws[0], gs[0], states[0])  # index 0 alone: effective wd 0, allowed
    assert not torch.equal(ws[0], before[0])


def test_group_adagrad_multi_precision_through_the_generic_wrapper():
    rec = get_record("groupadagrad")
    assert "multi_precision" in rec.capabilities
    opt = GroupAdaGrad(learning_rate=0.1, multi_precision=True)
    w16 = randn(4, 3, seed=26, dtype=torch.float16)
    state = opt.create_state_multi_precision(0, w16)
    w32, h = state
    assert w32.dtype == torch.float32 and h.shape == (4, 1)
    g = randn(4, 3, seed=27, dtype=torch.float16)
    opt.update_multi_precision(0, w16, g, state)
    ref = group_adagrad_ref(randn(4, 3, seed=26, dtype=torch.float16).float(), [g.float()], lr=0.1, eps=1e-5)
    torch.testing.assert_close(w32.to(F64), ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(w16, w32.half())


def re_escape(text):
    import re
    return re.escape(text)


def test_docstrings_say_torch_has_none_of_these():
    for cls in (Ftrl, FTML, LAMB, GroupAdaGrad):
        assert "torch.optim has no" in cls.__doc__, cls.__name__
    assert math.isclose(FTML().beta1, 0.6) and Ftrl().beta == 1
