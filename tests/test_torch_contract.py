"""torch.optim's optimizer contract, generic over the spec table (in the style of torch's own OptimizerInfo
tests): resume with schedulers, validated loads, dtype casting, hooks, deepcopy/pickle, distributed
checkpoint, tensor lr and compiled steps, all-or-nothing steps, custom optimizers."""
import copy
import io
import pickle

import pytest
import torch

import optzoo.torch as ot
from optzoo import optimizer
from specs import SPECS


pytestmark = pytest.mark.usefixtures("no_noise")


def spec_params():
    return [pytest.param(s, id=s.name) for s in SPECS]


def hyper(spec):
    kw = dict(spec.variants[-1])
    if "no_wd" not in spec.flags:
        kw["wd"] = 0.01
    return kw


def make(spec, dtype=torch.float32, seed=0, **extra):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in spec.shapes]
    return params, ot.create(spec.name, params, **hyper(spec), **extra)


def steps(opt, params, n, seed=1):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
        opt.step()


def weights(params):
    return [p.detach().clone() for p in params]


@pytest.mark.parametrize("spec", spec_params())
def test_resume_with_a_scheduler_uses_the_scheduled_lr(spec):
    """Saved after a MultiStepLR milestone and loaded into a fresh optimizer, the next steps use the
    scheduler's lr (the group's value), as an uninterrupted run does."""
    params, opt = make(spec)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[2], gamma=0.1)
    for k in range(3):
        steps(opt, params, 1, seed=k)
        sched.step()
    sd = copy.deepcopy(opt.state_dict())
    saved = weights(params)
    steps(opt, params, 2, seed=7)
    want = weights(params)
    fresh = [torch.nn.Parameter(w.clone()) for w in saved]
    opt2 = ot.create(spec.name, fresh, **hyper(spec))
    opt2.load_state_dict(sd)
    steps(opt2, fresh, 2, seed=7)
    for a, b in zip(want, fresh):
        assert torch.equal(a, b.detach())


@pytest.mark.parametrize("bad", [-5.0, "abc", float("nan")])
def test_invalid_loaded_hyperparameters_are_refused_and_change_nothing(bad):
    params, opt = make(next(s for s in SPECS if s.name == "adam"))
    steps(opt, params, 1)
    sd = copy.deepcopy(opt.state_dict())
    before = copy.deepcopy(opt.state_dict())
    sd["param_groups"][0]["lr"] = bad
    with pytest.raises(ValueError, match="param group 0"):
        opt.load_state_dict(sd)
    assert opt.state_dict()["param_groups"] == before["param_groups"]


@pytest.mark.parametrize("spec", spec_params())
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.filterwarnings("ignore:Accumulating with")
def test_an_fp32_checkpoint_loads_into_a_model_of_another_dtype(spec, dtype):
    """torch casts each state to its parameter's dtype; the optimizer then steps in that dtype."""
    params, opt = make(spec)
    steps(opt, params, 2)
    other = [torch.nn.Parameter(p.detach().to(dtype)) for p in params]
    opt2 = ot.create(spec.name, other, **hyper(spec))
    opt2.load_state_dict(opt.state_dict())
    for p in other:
        for name, value in opt2.state[p].items():
            if isinstance(value, torch.Tensor):
                assert value.dtype in (dtype, torch.float32)  # fp32 where the optimizer keeps it so
    steps(opt2, other, 1)
    assert all(p.dtype == dtype for p in other)


@pytest.mark.parametrize("spec", spec_params())
def test_multi_precision_master_copies_survive_a_round_trip(spec):
    params, opt = make(spec, dtype=torch.float16, multi_precision=True)
    steps(opt, params, 2)
    sd = copy.deepcopy(opt.state_dict())
    fresh = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = ot.create(spec.name, fresh, **hyper(spec), multi_precision=True)
    opt2.load_state_dict(sd)
    for p, q in zip(params, fresh):
        for name, value in opt.state[p].items():
            got = opt2.state[q][name]
            assert (torch.equal(value, got) and value.dtype == got.dtype) if isinstance(value, torch.Tensor) \
                else value == got


@pytest.mark.parametrize("spec", spec_params())
def test_deepcopy_pickle_and_torch_save_give_an_optimizer_that_steps_the_same(spec):
    params, opt = make(spec)
    steps(opt, params, 2)
    bundle = copy.deepcopy((params, opt))
    buf = io.BytesIO()
    torch.save((params, opt), buf)
    buf.seek(0)
    copies = [bundle, pickle.loads(pickle.dumps((params, opt))), torch.load(buf, weights_only=False)]
    steps(opt, params, 1, seed=3)
    for ps, o in copies:
        steps(o, ps, 1, seed=3)
        for a, b in zip(params, ps):
            assert torch.equal(a.detach(), b.detach())


def test_load_state_dict_hooks_run_and_state_dict_tolerates_foreign_entries():
    params, opt = make(next(s for s in SPECS if s.name == "adam"))
    steps(opt, params, 1)
    seen = []
    opt.register_load_state_dict_pre_hook(lambda o, sd: seen.append("pre"))
    opt.register_load_state_dict_post_hook(lambda o: seen.append("post"))
    opt.register_state_dict_post_hook(lambda o, sd: seen.append("sd"))
    opt.load_state_dict(opt.state_dict())
    assert seen == ["sd", "pre", "post"]
    opt.state["extra"] = 3  # a non-dict entry, as a state-dict pre-hook may add
    assert opt.state_dict()["state"]["extra"] == 3


def test_distributed_checkpoint_state_dict_round_trip():
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    opt = ot.LAMB(model.parameters(), lr=0.01)
    for _ in range(2):
        model(torch.randn(3, 4)).sum().backward()
        opt.step()
        opt.zero_grad()
    msd, osd = get_state_dict(model, opt)
    osd = copy.deepcopy(osd)
    model2 = copy.deepcopy(model)
    opt2 = ot.LAMB(model2.parameters(), lr=0.5)
    set_state_dict(model2, opt2, model_state_dict=msd, optim_state_dict=osd)
    x = torch.randn(3, 4)
    for m, o in ((model, opt), (model2, opt2)):
        m(x).sum().backward()
        o.step()
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_compiled_step_with_a_tensor_lr_settles():
    """torch.compile(opt.step) under a scheduler with a tensor lr: at most 2 compiles over 20 steps (the
    optimizer's Python bookkeeping runs outside the graph), the same numbers as plain steps."""
    from torch._dynamo.utils import counters

    def run(compiled):
        torch.manual_seed(0)
        model = torch.nn.Linear(8, 2)
        opt = ot.SGD(model.parameters(), lr=torch.tensor(0.05), momentum=0.9)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
        step = torch.compile(opt.step) if compiled else opt.step
        for _ in range(20):
            model(torch.randn(4, 8)).sum().backward()
            step()
            sched.step()
            opt.zero_grad()
        return [p.detach().clone() for p in model.parameters()]

    counters.clear()
    got = run(True)
    assert counters["stats"]["unique_graphs"] <= 2
    for a, b in zip(run(False), got):
        assert torch.equal(a, b)


def test_a_bad_gradient_in_a_later_group_changes_nothing():
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    opt = ot.Adam([{"params": [a]}, {"params": [b]}], lr=0.1)
    a.grad, b.grad = torch.ones(3), torch.sparse_coo_tensor([[2]], [1.0], (2,), check_invariants=False)  # row 2 of 2
    with pytest.raises(ValueError, match="grad for index 1"):
        opt.step()
    assert torch.equal(a.detach(), torch.ones(3)) and not opt.state
    b.grad = torch.ones(2)
    opt.param_groups[1]["lr"] = -1.0
    with pytest.raises(ValueError, match="param group 1"):
        opt.step()
    assert torch.equal(a.detach(), torch.ones(3)) and not opt.state


@pytest.mark.parametrize("n", [1, 4, 6])
def test_a_bad_gradient_in_a_later_group_adds_no_state_to_an_earlier_group(n):
    """The first step of a group the face runs as one plan (its steady-state lane) reads its states without
    making empty ones (``self.state`` is a defaultdict) before a later group's check fails."""
    first = [torch.nn.Parameter(torch.ones(70_000 if k == 0 else 3)) for k in range(n)]
    b = torch.nn.Parameter(torch.ones(2))
    opt = ot.Adam([{"params": first}, {"params": [b]}], lr=0.1)
    for p in first:
        p.grad = torch.ones_like(p)
    b.grad = torch.sparse_coo_tensor([[2]], [1.0], (2,), check_invariants=False)  # row 2 of 2
    with pytest.raises(ValueError, match=f"grad for index {n}"):
        opt.step()
    assert not opt.state and all(torch.equal(p.detach(), torch.ones_like(p)) for p in first)


def test_complex_weights_are_refused():
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.complex64))
    p.grad = torch.ones(3, dtype=torch.complex64)
    for fused in (None, True, False):
        with pytest.raises(TypeError, match="floating-point"):
            ot.Adam([p], fused=fused).step()


@pytest.mark.parametrize("fused", [None, False, True])
def test_a_custom_optimizer_with_its_own_update_works_through_the_face(fused, monkeypatch):
    """The README's custom optimizer: a scalar ``update(index, weight, grad, state)``."""
    monkeypatch.setattr(optimizer.registry, "_RECORDS", dict(optimizer.registry._RECORDS))
    monkeypatch.setattr(optimizer.registry, "_NAMES", dict(optimizer.registry._NAMES))

    @optimizer.register
    class MySGD(optimizer.Optimizer):
        """w <- w - lr * rescale_grad * g."""

        def update(self, index, weight, grad, state):
            self._update_count(index)
            lr = self._get_lr(index)
            weight -= lr * self.rescale_grad * grad

    params = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))]
    opt = ot.MySGD(params, lr=0.5, fused=fused)
    for p in params:
        p.grad = torch.full(p.shape, 2.0)
    opt.step()
    assert all(torch.equal(p.detach(), torch.zeros(p.shape)) for p in params)


@pytest.mark.parametrize("spec", spec_params())
def test_state_dict_is_deterministic_and_round_trips(spec):
    params, opt = make(spec)
    steps(opt, params, 2)
    first = opt.state_dict()
    again = opt.state_dict()
    assert first["param_groups"] == again["param_groups"] and first["state"].keys() == again["state"].keys()
    fresh = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = ot.create(spec.name, fresh, **hyper(spec))
    opt2.load_state_dict(copy.deepcopy(first))
    back = opt2.state_dict()
    assert back["param_groups"] == first["param_groups"]
    for k, entry in first["state"].items():
        for name, value in entry.items():
            other = back["state"][k][name]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other


@pytest.mark.parametrize("spec", spec_params())
def test_a_zero_gradient_leaves_the_weights_where_the_math_says_so(spec):
    """With wd 0, a first step on a zero gradient moves nothing (up to rounding: FTML recomputes w as
    -z/d from z = -d*w), except where the rule itself moves weights without a gradient (spec flag
    moves_on_zero_grad)."""
    kw = {k: v for k, v in hyper(spec).items() if k != "wd"}
    params = [torch.nn.Parameter(torch.randn(s)) for s in spec.shapes]
    before = weights(params)
    opt = ot.create(spec.name, params, **kw)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    moved = any(not torch.allclose(a, p.detach(), rtol=1e-6, atol=0) for a, p in zip(before, params))
    assert moved == ("moves_on_zero_grad" in spec.flags)


def test_closure_zero_grad_and_add_param_group():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    opt = ot.Adam(model.parameters(), lr=0.1)
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = model(torch.ones(2, 3)).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert calls == [1] and isinstance(loss, torch.Tensor)
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    extra = torch.nn.Parameter(torch.ones(2))
    opt.add_param_group({"params": [extra], "lr": 0.5})
    extra.grad = torch.ones(2)
    opt.step()
    assert opt.param_groups[1]["lr"] == 0.5 and set(opt.state) == {model.weight, model.bias, extra}


def test_a_parameter_twice_in_one_group_is_refused():
    """torch only warns; a repeated parameter would be stepped twice on one path and once on another."""
    import optzoo.torch as ot
    p, q = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="position 2 of the group is the one at position 0"):
        ot.SGD([p, q, p], lr=0.1)
    opt = ot.SGD([q], lr=0.1)
    with pytest.raises(ValueError, match="position 1 of the group is the one at position 0"):
        opt.add_param_group({"params": iter([p, p])})
    assert len(opt.param_groups) == 1  # nothing added
    opt.add_param_group({"params": (x for x in [p])})  # a generator is read once, as torch reads it
    assert opt.param_groups[1]["params"] == [p]
