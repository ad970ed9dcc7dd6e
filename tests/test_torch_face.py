"""The torch.optim.Optimizer face: same numbers as the MXNet-style API, param groups, torch schedulers,
GradScaler, state dicts. Spec-driven; nothing branches on an optimizer's name."""
import copy
import io

import pytest
import torch

import optzoo
import optzoo.torch as ot
from optzoo import optimizer
from optzoo.optimizer._tree import leaves
from specs import SPECS


def variant_params():
    return [pytest.param(s, v, id=f"{s.name}-v{i}") for s in SPECS for i, v in enumerate(s.variants)]


def spec_params():
    return [pytest.param(s, id=s.name) for s in SPECS]


def kwargs_for(spec, variant):
    kw = dict(variant)
    if "no_wd" not in spec.flags:
        kw["wd"] = 0.01
    return kw


def make_params(spec, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in spec.shapes]


def grads_for(spec, steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen) for s in spec.shapes] for _ in range(steps)]


@pytest.mark.parametrize("spec,variant", variant_params())
def test_same_numbers_as_the_mxnet_style_api(spec, variant):
    kw = kwargs_for(spec, variant)
    grads = grads_for(spec, 5)
    torch.manual_seed(5)
    params = make_params(spec)
    face = ot.create(spec.name, params, fused=False, **kw)  # the fast path's parity: test_fast_path.py
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        face.step()

    torch.manual_seed(5)
    ws = [p.detach().clone() for p in make_params(spec)]
    opt = optimizer.create(spec.name, **kw)
    states = [opt.create_state_multi_precision(i, w) for i, w in enumerate(ws)]
    for gs in grads:
        for i in range(2):
            opt.update_multi_precision(i, ws[i], gs[i], states[i])
    for p, w in zip(params, ws):
        assert torch.equal(p.detach(), w)
    for p, s in zip(params, states):
        for a, b in zip(leaves(face.mx_state(p)), leaves(s)):
            assert torch.equal(a, b)


def test_every_registered_optimizer_has_a_face_with_its_class_name():
    for rec in optimizer.registry.records():
        cls = getattr(ot, rec.cls.__name__)
        assert issubclass(cls, torch.optim.Optimizer) and cls.optimizer_class is rec.cls


def test_custom_optimizer_gets_a_face(monkeypatch):
    monkeypatch.setattr(optimizer.registry, "_RECORDS", dict(optimizer.registry._RECORDS))
    monkeypatch.setattr(optimizer.registry, "_NAMES", dict(optimizer.registry._NAMES))

    @optimizer.register
    class HalfStep(optimizer.Optimizer):
        r"""w <- w - lr/2 * g (``.. math::`` w \leftarrow w - lr\,g/2; no torch equivalent)."""

        def rule(self, w, g, state, *, lr, wd, t, index):
            return w - 0.5 * lr * g, None

    p = torch.nn.Parameter(torch.ones(3))
    face = ot.HalfStep([p], lr=0.2)
    p.grad = torch.full((3,), 2.0)
    face.step()
    assert p.detach().tolist() == pytest.approx([0.8] * 3)


def test_torch_aliases_and_errors():
    p = [torch.nn.Parameter(torch.zeros(2))]
    opt = ot.Adam(p, lr=0.1, weight_decay=0.5, betas=(0.8, 0.9))
    inner = opt.mxnet_optimizer(0)
    assert (inner.lr, inner.wd, inner.beta1, inner.beta2) == (0.1, 0.5, 0.8, 0.9)
    assert ot.FTML(p, beta1=0.6).defaults["betas"] == (0.6, 0.999)   # a lone beta keeps the other's default
    assert ot.SGD(p).defaults["rescale_grad"] == 1.0
    with pytest.raises(TypeError, match="both 'learning_rate' and its alias 'lr'"):
        ot.Adam(p, lr=0.1, learning_rate=0.1)
    with pytest.raises(TypeError, match="'bogus'"):
        ot.Adam(p, bogus=1)
    with pytest.raises(TypeError, match="'lr_scheduler' is not supported"):
        ot.Adam(p, lr_scheduler=optzoo.lr_scheduler.FactorScheduler(step=2))
    with pytest.raises(ValueError, match="beta1=1.5"):
        ot.Adam(p, betas=(1.5, 0.9))


def test_param_groups_have_their_own_hyperparameters():
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))
    opt = ot.SGD([{"params": [a]}, {"params": [b], "lr": 0.01, "momentum": 0.5}], lr=0.1, momentum=0.9)
    for _ in range(3):
        a.grad, b.grad = torch.ones(2), torch.ones(3)
        opt.step()
    # closed form: mom_k = mu*mom_{k-1} - lr; w = 1 + sum(mom)
    def run(lr, mu):
        w, m = 1.0, 0.0
        for _ in range(3):
            m = mu * m - lr
            w += m
        return w
    assert a.detach().tolist() == pytest.approx([run(0.1, 0.9)] * 2, rel=1e-6)
    assert b.detach().tolist() == pytest.approx([run(0.01, 0.5)] * 3, rel=1e-6)
    with pytest.raises(ValueError, match="momentum=2"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(1))], "momentum": 2})
    assert len(opt.param_groups) == 2


def test_torch_lr_scheduler_takes_effect():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = ot.SGD([p], lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(3):
        p.grad = torch.ones(1)
        opt.step()
        sched.step()
    assert p.item() == pytest.approx(-(1 + 0.5 + 0.25))


def test_one_cycle_drives_lr_and_betas():
    model = torch.nn.Linear(4, 2)
    opt = ot.create("lamb", model.parameters(), learning_rate=1e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.01, total_steps=10)
    for _ in range(4):
        model(torch.randn(3, 4)).sum().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    inner, group = opt.mxnet_optimizer(0), opt.param_groups[0]
    assert inner.lr == group["lr"] and (inner.beta1, inner.beta2) == tuple(group["betas"])
    assert inner.beta1 != 0.9  # OneCycle cycled the momentum


def test_grad_scaler_equals_unscaled_training_and_skips_inf():
    def train(use_scaler, poison=False):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 2)
        opt = ot.Adam(model.parameters(), lr=0.01)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8) if use_scaler else None
        x = torch.randn(5, 4)
        for k in range(3):
            loss = model(x).pow(2).sum()
            if use_scaler:
                scaler.scale(loss).backward()
                if poison and k == 2:
                    model.weight.grad[0, 0] = float("inf")
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
            opt.zero_grad()
        return [p.detach().clone() for p in model.parameters()], opt
    plain, _ = train(False)
    scaled, _ = train(True)
    for a, b in zip(plain, scaled):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    _, opt = train(True, poison=True)
    assert all(opt.state[p]["step"] == 2 for p in opt.state)  # the inf step was skipped, not counted


@pytest.mark.parametrize("fused", [False, None])
def test_params_without_grad_are_skipped_and_closure_returns_loss(fused):
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    opt = ot.SGD([a, b], lr=0.5, fused=fused)

    def closure():
        opt.zero_grad()
        loss = (a * 3).sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == 6.0
    assert a.detach().tolist() == [-0.5, -0.5] and b.detach().tolist() == [1.0, 1.0]
    assert opt.state[a]["step"] == 1 and opt.state.get(b, {}).get("step", 0) == 0


@pytest.mark.parametrize("spec", spec_params())
def test_state_dict_resumes_bit_identically(spec):
    kw = kwargs_for(spec, spec.variants[-1])
    grads = grads_for(spec, 6)

    def steps(opt, params, gs):
        for g in gs:
            for p, gi in zip(params, g):
                p.grad = gi.clone()
            opt.step()

    torch.manual_seed(3)
    params = make_params(spec)
    opt = ot.create(spec.name, params, **kw)
    steps(opt, params, grads[:3])
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)               # a real serialisation round trip
    saved_weights = [p.detach().clone() for p in params]
    rng = torch.get_rng_state()
    steps(opt, params, grads[3:])

    fresh = [torch.nn.Parameter(w.clone()) for w in saved_weights]
    opt2 = ot.create(spec.name, fresh)
    buf.seek(0)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    torch.set_rng_state(rng)
    steps(opt2, fresh, grads[3:])
    for a, b in zip(params, fresh):
        assert torch.equal(a.detach(), b.detach())
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


@pytest.mark.parametrize("spec", spec_params())
def test_load_state_dict_rejects_other_optimizer_or_shapes_and_changes_nothing(spec):
    params = make_params(spec)
    opt = ot.create(spec.name, params, **kwargs_for(spec, spec.variants[-1]))
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    before = copy.deepcopy(opt.state_dict())
    bad = copy.deepcopy(before)
    for entry in bad["state"].values():
        for name in [k for k, v in entry.items() if isinstance(v, torch.Tensor)]:
            entry[name] = torch.zeros(7)
    if any(isinstance(v, torch.Tensor) for e in before["state"].values() for v in e.values()):
        with pytest.raises(ValueError, match="state_dict state of parameter"):
            opt.load_state_dict(bad)
    bad = copy.deepcopy(before)
    bad["param_groups"][0]["lr"] = -5.0
    with pytest.raises(ValueError, match="param group 0"):
        opt.load_state_dict(bad)
    with pytest.raises(ValueError, match="param groups|parameters"):
        ot.create(spec.name, params[:1]).load_state_dict(before)
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for k in before["state"]:
        for name, value in before["state"][k].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(after["state"][k][name]))
