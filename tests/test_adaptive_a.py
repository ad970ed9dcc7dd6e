"""AdaGrad, RMSProp, AdaDelta, Adamax, Nadam: what the MXNet golden fixtures cannot check.

The fixtures (``test_mxnet_parity.py``) cover every spec case MXNet 1.9.1 can run, and
``test_numerics.py`` the numerics helpers. Here: Nadam's shared momentum schedule over an irregular
index order, weight clipping, AdaDelta's untouched gradient and ignored learning rate, and the fp32
states of AdaGrad/RMSProp/AdaDelta under fp64/bf16/fp16 weights (which MXNet rejects), against
float64 re-derivations in numpy.
"""
from __future__ import annotations


import numpy as np
import pytest
import torch

from optzoo.optimizer import AdaDelta, AdaGrad, Adamax, Nadam, RMSProp, Updater


def _randn(*shape, seed, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


# ------------------------------------------------------------------------------ Nadam
def test_nadam_shared_schedule_follows_call_order():
    """m_schedule is one product over every update() of any index, each with that index's own t."""
    b1, psi = 0.85, 0.02
    opt = Nadam(learning_rate=0.01, beta1=b1, schedule_decay=psi)
    order = [2, 0, 0, 1, 2, 2, 2, 0, 1, 1, 0, 2]
    weights = {i: _randn(4, seed=i, dtype=torch.float64) for i in range(3)}
    states = {i: opt.create_state(i, w) for i, w in weights.items()}
    expected, counts = 1.0, {}
    for step, i in enumerate(order):
        counts[i] = counts.get(i, 0) + 1
        expected *= b1 * (1.0 - 0.5 * 0.96 ** (counts[i] * psi))
        opt.update(i, weights[i], _randn(4, seed=100 + step, dtype=torch.float64), states[i])
        assert opt.m_schedule == expected, f"step {step}"


def test_nadam_step_against_float64_rederivation():
    """One update of index 1 after two of index 0: the shared M enters index 1's first step."""
    b1, b2, eps, lr, psi, wd = 0.9, 0.99, 1e-6, 0.05, 0.004, 0.01
    opt = Nadam(learning_rate=lr, beta1=b1, beta2=b2, epsilon=eps, schedule_decay=psi, wd=wd)
    w0, w1 = _randn(3, seed=1, dtype=torch.float64), _randn(5, seed=2, dtype=torch.float64)
    s0, s1 = opt.create_state(0, w0), opt.create_state(1, w1)
    for seed in (10, 11):
        opt.update(0, w0, _randn(3, seed=seed, dtype=torch.float64), s0)
    w, g = w1.numpy().copy(), _randn(5, seed=12, dtype=torch.float64).numpy()
    opt.update(1, w1, torch.from_numpy(g), s1)

    mu = [b1 * (1 - 0.5 * 0.96 ** (t * psi)) for t in (1, 2, 1, 2)]  # index 0: t=1, 2; index 1: t=1
    M = mu[0] * mu[1] * mu[2]
    G = g + wd * w
    m, v = (1 - b1) * G, (1 - b2) * G * G
    m_bar = (1 - mu[2]) * G / (1 - M) + mu[3] * m / (1 - M * mu[3])
    expected = w - lr * m_bar / (np.sqrt(v / (1 - b2)) + eps)
    np.testing.assert_allclose(w1.numpy(), expected, rtol=1e-13, atol=0)
    np.testing.assert_allclose(s1[0].numpy(), m, rtol=1e-14)


def test_nadam_schedule_survives_updater_dump():
    """A run saved and restored with the optimizer continues exactly as an uninterrupted one."""
    def run(split):
        opt = Nadam(learning_rate=0.01)
        up = Updater(opt)
        w = [_randn(3, seed=1), _randn(2, seed=2)]
        for step in range(8):
            if step == split:
                blob = up.get_states(dump_optimizer=True)
                up = Updater(Nadam(learning_rate=0.01))
                up.set_states(blob)
            i = step % 2
            up(i, _randn(*w[i].shape, seed=50 + step), w[i])
        return w, up.optimizer.m_schedule

    (wa, ma), (wb, mb) = run(split=None), run(split=5)
    assert ma == mb
    assert all(torch.equal(a, b) for a, b in zip(wa, wb))


# ------------------------------------------------------------------------------ RMSProp
@pytest.mark.parametrize("centered", [False, True])
def test_rmsprop_clip_weights_bound_holds(centered):
    cw = 0.3
    opt = RMSProp(learning_rate=0.5, centered=centered, clip_weights=cw)
    w = _randn(50, seed=4)
    state = opt.create_state(0, w)
    for step in range(6):
        opt.update(0, w, _randn(50, seed=20 + step) * 10, state)
        assert w.abs().max().item() <= np.float32(cw)
        assert (w.abs() == np.float32(cw)).any(), "a bound this tight must be reached"


def test_rmsprop_centered_clip_keeps_unclipped_delta():
    """MXNet's rmspropalex clips only the weight it writes; delta keeps the unclipped step."""
    g1, g2, lr, eps, cw = 0.9, 0.8, 0.5, 1e-8, 0.2
    opt = RMSProp(learning_rate=lr, gamma1=g1, gamma2=g2, epsilon=eps, centered=True, clip_weights=cw)
    w = _randn(20, seed=5, dtype=torch.float64)
    w_np, g_np = w.numpy().copy(), _randn(20, seed=6, dtype=torch.float64).numpy()
    n, gbar, delta = opt.create_state(0, w)
    opt.update(0, w, torch.from_numpy(g_np), (n, gbar, delta))
    n_ref = (1 - g1) * g_np * g_np
    gbar_ref = (1 - g1) * g_np
    delta_ref = -lr * g_np / np.sqrt(n_ref - gbar_ref ** 2 + eps)
    np.testing.assert_allclose(delta.numpy(), delta_ref.astype(np.float32), rtol=1e-6)
    np.testing.assert_allclose(w.numpy(), np.clip(w_np + delta.numpy(), -cw, cw), rtol=1e-7)
    assert (np.abs(w_np + delta_ref) > cw).any(), "the test must actually clip"


def test_rmsprop_state_layout():
    w = torch.zeros(3, dtype=torch.float64)
    plain, centered = RMSProp().create_state(0, w), RMSProp(centered=True).create_state(0, w)
    assert isinstance(plain, tuple) and len(plain) == 1
    assert isinstance(centered, tuple) and len(centered) == 3
    assert all(s.dtype == torch.float32 for s in plain + centered)


# ------------------------------------------------------------------------------ AdaDelta
def test_adadelta_leaves_grad_untouched_and_ignores_lr():
    g = _randn(6, seed=7)
    g_before = g.clone()
    results = []
    for kwargs in ({"learning_rate": 0.01}, {"learning_rate": 5.0}, {"lr_scheduler": lambda n: 1e-3 * n}):
        opt = AdaDelta(wd=0.01, rescale_grad=0.5, **kwargs)
        opt.set_lr_mult({0: 3.0})
        w = _randn(6, seed=8)
        state = opt.create_state(0, w)
        for _ in range(3):
            opt.update(0, w, g, state)
        assert torch.equal(g, g_before), "AdaDelta must not scale the caller's gradient"
        results.append(w)
    assert all(torch.equal(results[0], r) for r in results[1:])


# ------------------------------------------------------------------------------ fp32 states under other dtypes
def _numpy_reference(name, w, grads, kwargs):
    """float64 re-derivation of a few steps, states rounded to fp32 when stored."""
    def stored(x):
        return x.astype(np.float32).astype(np.float64)

    def f32(x):  # RMSProp's fused kernel holds its hyperparameters in fp32 fields
        return float(np.float32(x))

    s = [np.zeros_like(w, dtype=np.float64) for _ in range(2)]
    lr, wd = kwargs.get("learning_rate", 0.01), kwargs.get("wd", 0.0)
    for g in grads:
        if name == "adagrad":
            h = s[0] + g * g
            w = w - lr * (g / np.sqrt(h + kwargs["eps"]) + wd * w)
            s[0] = stored(h)
        elif name == "rmsprop":
            g1 = f32(kwargs["gamma1"])
            G = g + f32(wd) * w
            n = (1 - g1) * G * G + g1 * s[0]
            w = w - f32(lr) * G / np.sqrt(n + f32(kwargs["epsilon"]))
            s[0] = stored(n)
        else:  # adadelta
            rho, eps = kwargs["rho"], kwargs["epsilon"]
            acc_g = rho * s[0] + (1 - rho) * g * g
            d = np.sqrt(s[1] + eps) / np.sqrt(acc_g + eps) * g
            s[0], s[1] = stored(acc_g), stored(rho * s[1] + (1 - rho) * d * d)
            w = w - (d + wd * w)
    return w


FP32_STATE = {
    "adagrad": (AdaGrad, {"eps": 1e-5, "learning_rate": 0.1, "wd": 0.01}),
    "rmsprop": (RMSProp, {"gamma1": 0.75, "epsilon": 1e-6, "learning_rate": 0.01, "wd": 0.01}),
    "adadelta": (AdaDelta, {"rho": 0.8, "epsilon": 1e-4, "wd": 0.01}),
}


@pytest.mark.parametrize("name", sorted(FP32_STATE))
def test_fp32_states_with_fp64_weights(name):
    """fp64 weights: fp64 arithmetic, states stored in fp32 (MXNet 1.9.1 raises here). The tolerance
    covers the scalars' one-ulp parse error (``mx_scalar``); fp32 rounding anywhere else is ~1e-8."""
    cls, kwargs = FP32_STATE[name]
    opt = cls(**kwargs)
    w = _randn(4, 3, seed=9, dtype=torch.float64)
    w_init = w.numpy().copy()
    grads = [_randn(4, 3, seed=30 + k, dtype=torch.float64) for k in range(5)]
    state = opt.create_state(0, w)
    for g in grads:
        opt.update(0, w, g, state)
    states = state if isinstance(state, tuple) else (state,)
    assert w.dtype == torch.float64 and all(s.dtype == torch.float32 for s in states)
    expected = _numpy_reference(name, w_init, [g.numpy() for g in grads], kwargs)
    np.testing.assert_allclose(w.numpy(), expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", sorted(FP32_STATE))
def test_fp32_states_with_low_precision_weights(name, dtype):
    """bf16/fp16 weights without multi_precision: an fp32 computation whose weight is rounded to the
    weight dtype after every step, states kept in fp32."""
    cls, kwargs = FP32_STATE[name]
    opt, ref = cls(**kwargs), cls(**kwargs)
    w = _randn(7, seed=10, dtype=dtype)
    w_ref = w.float()
    state = opt.create_state(0, w)
    state_ref = ref.create_state(0, w_ref)
    for k in range(5):
        g = _randn(7, seed=40 + k, dtype=dtype)
        opt.update(0, w, g, state)
        ref.update(0, w_ref, g.float(), state_ref)
        w_ref = w_ref.to(dtype).float()
        assert w.dtype == dtype
        assert torch.equal(w.float(), w_ref)
    for s, s_ref in zip(*(x if isinstance(x, tuple) else (x,) for x in (state, state_ref))):
        assert s.dtype == torch.float32 and torch.equal(s, s_ref)


# ------------------------------------------------------------------------------ Adamax
def test_adamax_has_no_epsilon():
    """A coordinate whose gradient was always exactly 0 divides 0 by 0, as MXNet 1.9.1 does."""
    opt = Adamax()
    w = torch.ones(3)
    state = opt.create_state(0, w)
    opt.update(0, w, torch.tensor([0.0, 1.0, -2.0]), state)
    assert w[0].isnan() and torch.isfinite(w[1:]).all()
    # |G| = u after one step, so the step is lr/(1-beta1) * (1-beta1) * sign(G) = lr * sign(G)
    torch.testing.assert_close(w[1:], torch.tensor([1 - 0.002, 1 + 0.002]), rtol=0, atol=1e-7)
