"""NAG / Signum / LBSGD / LARS / DCASGD / SGLD behaviour that the MXNet fixtures cannot check.

Where MXNet 1.9.1 raises (DCASGD with momentum, SignSGD with ``wd_lh``) or cannot be replayed (SGLD's
noise, LBSGD's accumulation details, LARS's name rule), the numbers are checked against float64
references written from the equations, or against closed forms.
"""
import math

import pytest
import torch

from optzoo import optimizer
from optzoo.optimizer._numerics import mx_float

F64 = torch.float64


def _gen_tensors(shapes, steps, seed=0, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    ws = [0.5 * torch.randn(s, generator=gen, dtype=F64) for s in shapes]
    gs = [torch.randn(shapes[k], generator=gen, dtype=F64) for k in steps]
    return [w.to(dtype) for w in ws], [g.to(dtype) for g in gs]


SEQ = [0, 1, 1, 0, 0, 1, 0, 1, 1, 0, 0, 0, 1, 1]
SHAPES = [(3, 4), (5,)]


def _clip(x, c):
    return x.clamp(-c, c) if c else x


# ----------------------------------------------------------------------------------------------- DCASGD
def _dcasgd_reference(ws, gs, seq, *, lr, lr_mult1, wd, mu, lamda, rg, clip):
    w = [x.double().clone() for x in ws]
    prev = [x.clone() for x in w]
    mom = [torch.zeros_like(x) for x in w]
    out = []
    for k, g in zip(seq, gs):
        lr_k = lr * (lr_mult1 if k == 1 else 1.0)
        G = _clip(rg * g.double(), clip and mx_float(clip))  # MXNet's clip bounds are fp32 parameters
        mom[k] = mu * mom[k] - lr_k * (G + wd * w[k] + lamda * G * G * (w[k] - prev[k]))
        prev[k] = w[k].clone()
        w[k] = w[k] + mom[k]
        out.append((w[k].clone(), mom[k].clone(), prev[k].clone()))
    return out


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("clip", [None, 0.4])
def test_dcasgd_momentum_matches_float64_reference(dtype, rtol, clip):
    """MXNet 1.9.1 raises for momentum > 0; optzoo implements mom = mu*mom - lr*(...), w += mom."""
    hp = dict(lr=0.2, lr_mult1=0.5, wd=0.03, mu=0.7, lamda=0.8, rg=1.5, clip=clip)
    ws, gs = _gen_tensors(SHAPES, SEQ, seed=1, dtype=dtype)
    expected = _dcasgd_reference(ws, gs, SEQ, **hp)
    opt = optimizer.DCASGD(momentum=hp["mu"], lamda=hp["lamda"], learning_rate=hp["lr"], wd=hp["wd"],
                           rescale_grad=hp["rg"], clip_gradient=clip)
    opt.set_lr_mult({1: hp["lr_mult1"]})
    states = [opt.create_state(k, w) for k, w in enumerate(ws)]
    for (k, g), (w_ref, mom_ref, prev_ref) in zip(zip(SEQ, gs), expected):
        opt.update(k, ws[k], g, states[k])
        mom, prev = states[k]
        for got, ref in ((ws[k], w_ref), (mom, mom_ref), (prev, prev_ref)):
            assert got.dtype == dtype
            torch.testing.assert_close(got.double(), ref, rtol=rtol, atol=rtol * 1e-2)


def test_dcasgd_momentum_differs_from_plain_and_zero_momentum_keeps_no_buffer():
    ws, gs = _gen_tensors(SHAPES, SEQ, seed=2)
    finals = []
    for mu in (0.0, 0.9):
        opt = optimizer.DCASGD(momentum=mu, learning_rate=0.1)
        w = [x.clone() for x in ws]
        states = [opt.create_state(k, x) for k, x in enumerate(w)]
        assert (states[0][0] is None) == (mu == 0.0)
        for k, g in zip(SEQ, gs):
            opt.update(k, w[k], g, states[k])
        finals.append(w[0])
    assert not torch.allclose(finals[0], finals[1], rtol=1e-3)


# ----------------------------------------------------------------------------------------------- Signum
@pytest.mark.parametrize("wd_lh", [0.0, 0.05])
def test_signsgd_closed_form(wd_lh):
    """momentum=0: w <- (1 - lr*wd - lr*wd_lh)*w - lr*sign(g); rescale_grad and clip have no effect."""
    lr, wd = 0.1, 0.02
    opt = optimizer.Signum(momentum=0.0, wd_lh=wd_lh, learning_rate=lr, wd=wd, rescale_grad=0.3,
                           clip_gradient=0.01)
    opt.set_lr_mult({1: 3.0})
    ws, gs = _gen_tensors(SHAPES, SEQ, seed=3)
    gs[0].view(-1)[:2] = 0.0  # sign(0) = 0: only the decay acts there
    assert opt.create_state(0, ws[0]) is None
    ref = [w.clone() for w in ws]
    for k, g in zip(SEQ, gs):
        # the kernel's hyperparameters are fp32 values even for fp64 weights (test_numerics.py)
        lr_k, wd_k, wd_lh_k = mx_float(lr * (3.0 if k == 1 else 1.0)), mx_float(wd), mx_float(wd_lh)
        ref[k] = (1 - lr_k * wd_k - lr_k * wd_lh_k) * ref[k] - lr_k * torch.sign(g)
        opt.update(k, ws[k], g, None)
        torch.testing.assert_close(ws[k], ref[k], rtol=1e-12, atol=1e-14)


def test_signsgd_wd_lh_decays_the_weight():
    w0 = torch.tensor([2.0, -2.0, 1.0], dtype=F64)
    g = torch.tensor([1.0, -1.0, 0.0], dtype=F64)
    out = []
    for wd_lh in (0.0, 0.5):
        w = w0.clone()
        optimizer.Signum(momentum=0.0, wd_lh=wd_lh, learning_rate=0.1).update(0, w, g, None)
        out.append(w)
    torch.testing.assert_close(out[0], torch.tensor([1.9, -1.9, 1.0], dtype=F64))
    torch.testing.assert_close(out[1], torch.tensor([1.8, -1.8, 0.95], dtype=F64))


# ----------------------------------------------------------------------------------------------- SGLD
def test_sgld_noise_statistics():
    """With g = 0 and w = 0 one update leaves only the noise: mean 0, variance lr (per index), Gaussian."""
    n, lr = 200_000, 0.04
    opt = optimizer.SGLD(learning_rate=lr)
    opt.set_lr_mult({1: 0.25})
    torch.manual_seed(0)
    for k, var in ((0, lr), (1, 0.25 * lr)):
        w = torch.zeros(n, dtype=F64)
        opt.update(k, w, torch.zeros_like(w), None)
        sd = math.sqrt(var)
        assert abs(float(w.mean())) <= 6 * sd / math.sqrt(n)
        assert abs(float(w.var()) - var) <= 6 * var * math.sqrt(2 / (n - 1))
        p = 0.6826894921370859  # P(|X| < sd) for a Gaussian
        frac = float((w.abs() < sd).double().mean())
        assert abs(frac - p) <= 6 * math.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_sgld_noise_has_the_weight_shape_dtype_and_device(dtype):
    w = torch.zeros(3, 4, dtype=dtype)
    noise = optimizer.SGLD()._noise(w, 0.09)
    assert noise.shape == w.shape and noise.dtype == dtype and noise.device == w.device


def test_sgld_drift_is_exact_without_noise():
    lr, wd, rg, clip = 0.3, 0.05, 0.7, 0.5
    opt = optimizer.SGLD(learning_rate=lr, wd=wd, rescale_grad=rg, clip_gradient=clip)
    opt.set_lr_mult({1: 2.0})
    calls = []

    def no_noise(weight, lr_k):
        calls.append(lr_k)
        return torch.zeros_like(weight)

    opt._noise = no_noise
    ws, gs = _gen_tensors(SHAPES, SEQ, seed=4)
    ref = [w.clone() for w in ws]
    for step, (k, g) in enumerate(zip(SEQ, gs)):
        lr_k = lr * (2.0 if k == 1 else 1.0)
        ref[k] = ref[k] - lr_k / 2 * (_clip(rg * g, clip) + wd * ref[k])
        opt.update(k, ws[k], g, None)
        assert calls[step:] == [lr_k], "exactly one noise draw per update, with the index's lr"
        torch.testing.assert_close(ws[k], ref[k], rtol=1e-12, atol=1e-14)


def _sgld_run(seed=None, generator=None):
    if seed is not None:
        torch.manual_seed(seed)
    opt = optimizer.SGLD(learning_rate=0.05, generator=generator)
    ws, gs = _gen_tensors(SHAPES, SEQ, seed=5, dtype=torch.float32)
    for k, g in zip(SEQ, gs):
        opt.update(k, ws[k], g, None)
    return ws


def test_sgld_reproducible_with_manual_seed():
    a, b, c = _sgld_run(seed=7), _sgld_run(seed=7), _sgld_run(seed=8)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])


def test_sgld_generator_is_the_noise_source():
    a = _sgld_run(seed=1, generator=torch.Generator().manual_seed(3))
    b = _sgld_run(seed=2, generator=torch.Generator().manual_seed(3))  # the global seed plays no part
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    # the noise is sqrt(lr) * counter_normal(key + i), the key one draw from that generator (below 2^57), times 32
    from optzoo.optimizer._numerics import counter_normal, in_dtype
    w = torch.zeros(6)
    opt = optimizer.SGLD(learning_rate=0.09, generator=torch.Generator().manual_seed(4))
    opt.update(0, w, torch.zeros(6), None)
    key = int(torch.randint(0, 1 << 57, (), generator=torch.Generator().manual_seed(4))) * 32
    want = in_dtype(math.sqrt(0.09), torch.float32) * counter_normal(key + torch.arange(6), torch.float32)
    assert torch.equal(w, want)


@pytest.mark.parametrize("seeded_by", ["manual_seed", "generator"])
def test_sgld_eager_fast_path_draws_the_reference_noise(seeded_by, monkeypatch):
    """fused=None draws one noise tensor per parameter, in order: the reference path's values (one draw
    over a whole pack would give others)."""
    import optzoo.torch as ot
    from optzoo.optimizer import engine
    calls = []
    execute = engine.execute
    monkeypatch.setattr(engine, "execute", lambda *a, **k: calls.append(1) or execute(*a, **k))

    def run(fused):
        torch.manual_seed(11)
        params = [torch.nn.Parameter(torch.zeros(s)) for s in ((40, 50), (40,), (7, 3, 5))]
        kw = {"generator": torch.Generator().manual_seed(3)} if seeded_by == "generator" else {}
        opt = ot.SGLD(params, fused=fused, lr=0.04, weight_decay=0.01, **kw)
        for _ in range(2):
            for p in params:
                p.grad = torch.ones_like(p)
            opt.step()
        return [p.detach() for p in params], opt

    ref, _ = run(False)
    assert not calls
    got, opt = run(None)
    assert calls, "the fast path ran"
    assert all(torch.equal(a, b) for a, b in zip(ref, got))


def test_sgld_rejects_a_non_generator():
    with pytest.raises(TypeError, match="generator"):
        optimizer.SGLD(generator=3)


# ----------------------------------------------------------------------------------------------- LBSGD
class _RecordingSchedule:
    """lr = 0.1 * 0.95**n, remembering every n it was asked for."""

    def __init__(self):
        self.base_lr = 0.1
        self.seen = []

    def __call__(self, num_update):
        self.seen.append(num_update)
        return 0.1 * 0.95 ** num_update


def _lbsgd_reference(ws, gs, seq, *, M, strategy, nwup, init, mu, wd, rg, clip):
    """MXNet 1.9.1's LBSGD in float64: lr read before counting, per-index accumulation, n never reset."""
    w = [x.double().clone() for x in ws]
    mom = [torch.zeros_like(x) for x in w]
    cum, n, counts, num_update, out = {}, {}, {}, 0, []
    for k, g in zip(seq, gs):
        lr = 0.1 * 0.95 ** num_update
        counts[k] = counts.get(k, 0) + 1
        num_update = max(num_update, counts[k])
        n[k] = n[k] + 1 if k in n else init + 1
        cum[k] = cum.get(k, 0) + g.double()
        if n[k] % M:
            out.append(None)
            continue
        gbar = cum[k] / M
        if strategy == "lars":
            s_w, s_g = float((w[k] ** 2).sum()), float((gbar ** 2).sum())
            rho = min(max(math.sqrt(s_w / (s_g + wd * s_w + 1e-18)), 0.01), 100.0)
        elif n[k] >= nwup:
            rho = M
        else:
            x = n[k] / nwup
            rho = 1 + (M - 1) * {"linear": x, "power2": x * x, "sqrt": math.sqrt(x)}[strategy]
        # sgd_mom_update's hyperparameters are fp32 values even for fp64 weights (test_numerics.py)
        lr_k, mu_k, wd_k = mx_float(lr * rho), mx_float(mu), mx_float(wd)
        G = _clip(mx_float(rg) * gbar, mx_float(clip))
        mom[k] = mu_k * mom[k] - lr_k * wd_k * w[k] - lr_k * G
        w[k] = w[k] + mom[k]
        cum[k] = 0
        out.append((w[k].clone(), mom[k].clone(), n[k]))
    return out


@pytest.mark.parametrize("strategy", ["linear", "power2", "sqrt", "lars"])
def test_lbsgd_accumulation_matches_float64_reference(strategy):
    # n starts at 5: updates at n = 6 (warming up), then at 9, 12, ... (n >= 8: rho = M)
    M, epochs, per_epoch, begin = 3, 2, 4, 1
    hp = dict(mu=0.9, wd=0.02, rg=0.8, clip=1.5)
    sched = _RecordingSchedule()
    opt = optimizer.LBSGD(momentum=hp["mu"], warmup_strategy=strategy, warmup_epochs=epochs, batch_scale=M,
                          updates_per_epoch=per_epoch, begin_epoch=begin, lr_scheduler=sched, wd=hp["wd"],
                          rescale_grad=hp["rg"], clip_gradient=hp["clip"])
    seq = SEQ + SEQ
    ws, gs = _gen_tensors(SHAPES, seq, seed=6)
    expected = _lbsgd_reference(ws, gs, seq, M=M, strategy=strategy, nwup=epochs * per_epoch,
                                init=begin * per_epoch, **hp)
    states = [opt.create_state(k, w) for k, w in enumerate(ws)]
    n_updates = 0
    for k, g, ref in zip(seq, gs, expected):
        before = ws[k].clone(), states[k].clone()
        opt.update(k, ws[k], g, states[k])
        if ref is None:  # accumulating: weight and momentum untouched
            assert torch.equal(ws[k], before[0]) and torch.equal(states[k], before[1])
            continue
        n_updates += 1
        w_ref, mom_ref, n_ref = ref
        torch.testing.assert_close(ws[k], w_ref, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(states[k], mom_ref, rtol=1e-12, atol=1e-14)
        assert opt.cumgrads[k]["num_cums"] == n_ref and opt.cumgrads[k]["cum_grad"] == 0
    assert n_updates == 10  # n = 6, 9, 12, 15, 18 for each index
    # lr read before counting: num_update before each of the first calls (counting first gives 1, 1, 2, 2)
    assert sched.seen[:4] == [0, 1, 1, 2]


def test_lbsgd_copies_the_first_gradient_of_a_large_batch():
    """MXNet keeps a reference to it; optzoo copies, so reusing the gradient buffer is safe."""
    results = []
    for reuse in (False, True):
        opt = optimizer.LBSGD(batch_scale=2, warmup_epochs=0, learning_rate=0.1)
        w = torch.zeros(4, dtype=F64)
        g = torch.ones(4, dtype=F64)
        opt.update(0, w, g, None)
        g2 = g if reuse else g.clone()
        g2.fill_(3.0)  # a training loop overwriting its gradient buffer
        opt.update(0, w, g2, None)
        results.append(w)
    # mean gradient (1 + 3)/2 = 2, multiplier M = 2 (warmup over), lr 0.1: w = -0.4
    for w in results:
        torch.testing.assert_close(w, torch.full((4,), -0.4, dtype=F64))


# ----------------------------------------------------------------------------------------------- LARS
def test_lars_name_exclusion_and_wd_rule():
    """Names ending in gamma/beta/bias keep the plain lr; only ``_weight`` names keep weight decay."""
    lr, eta, eps, wd, rg, clip = 0.5, 0.01, 1e-3, 0.1, 0.6, 0.9
    names = {0: "fc_weight", 1: "bn_gamma", 2: "bn_beta", 3: "fc_bias"}  # 4, 5: unnamed, "4" and "5"
    opt = optimizer.LARS(eta=eta, eps=eps, learning_rate=lr, wd=wd, rescale_grad=rg, clip_gradient=clip,
                         param_idx2name=names)
    assert opt.wd_mult == {"bn_gamma": 0.0, "bn_beta": 0.0, "fc_bias": 0.0}
    gen = torch.Generator().manual_seed(7)
    ws = [torch.randn(4, 3, generator=gen, dtype=F64) for _ in range(6)]
    ws[5].zero_()  # zero weight norm: no scaling
    gs = [torch.randn(4, 3, generator=gen, dtype=F64) for _ in range(6)]
    expected = []
    for k, (w, g) in enumerate(zip(ws, gs)):
        wd_k = wd if k in (0, 4, 5) else 0.0
        ratio = 1.0
        if k in (0, 4):
            ratio = eta * float(w.norm()) / (float((rg * g).norm()) + wd_k * float(w.norm()) + eps)
            assert ratio < 0.1  # the scaling is visible
        lr_k = lr * ratio
        expected.append((1 - lr_k * wd_k) * w - lr_k * _clip(rg * g, clip))
    opt.update(list(range(6)), ws, gs, [None] * 6)
    for k in range(6):
        # norms are taken in float32, as MXNet's
        torch.testing.assert_close(ws[k], expected[k], rtol=1e-6, atol=1e-9, msg=f"index {k} ({names.get(k)})")
