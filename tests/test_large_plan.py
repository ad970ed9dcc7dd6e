"""The executor's plan for large tensors (``_large._LargePlan``): a step over the same large tensors as a recent one
reuses its 1-D views and graph keys. Whatever the user changes between steps (re-bound, transposed or frozen
parameters, replaced, swapped, re-pointed or edited states, non-contiguous gradients, a reloaded state dict), the
result equals the same step without plans bit for bit, and, for elementwise rules, the reference path's."""
import pytest
import torch

import optzoo.torch as ot
from optzoo.optimizer import _large, engine

#: elementwise (Adam, SGD; Nadam and SGLD with scalars of each tensor's own: the schedule, the noise key), per-tensor
#: norms (LARS), two phases on the CPU (LAMB), per-row states (GroupAdaGrad); SGLD's lr keeps its noise from
#: blowing the model up (nan, which compares unequal)
OPTIMIZERS = {"Adam": {}, "SGD": {"momentum": 0.9, "wd": 1e-3}, "Nadam": {}, "SGLD": {"lr": 1e-5}, "LARS": {"momentum": 0.9},
              "LAMB": {}, "GroupAdaGrad": {}}
ELEMENTWISE = ("Adam", "SGD", "Nadam", "SGLD")  # compiled kernels equal the reference path bit for bit


def _model(seed, bias=True):
    torch.manual_seed(seed)
    # five square 256 x 256 weights (65,536 elements: large), a group of four and one alone; five small biases
    # (packed; none for GroupAdaGrad, whose weights are 2-D)
    return torch.nn.Sequential(*(torch.nn.Linear(256, 256, bias=bias) for _ in range(5)))


def _backward(model, gen):
    model(torch.randn(3, 256, generator=gen)).square().sum().backward()


def _weights(ps):
    return [p for p in ps if p.dim() == 2]


def _rebind(opt, ps):
    _weights(ps)[1].data = _weights(ps)[1].detach().clone()


def _transpose(opt, ps):
    w = _weights(ps)[2]
    w.data = w.detach().t()  # the same address and shape, other strides
    w.grad = w.grad.t().contiguous().t()


def _strided_grad(opt, ps):
    w = _weights(ps)[0]
    w.grad = w.grad.t().contiguous().t()  # the same values, column-major


def _freeze_one(opt, ps):
    _weights(ps)[3].grad = None


def _new_lr(opt, ps):
    opt.param_groups[0]["lr"] *= 0.5


def _state_names(opt, p):
    return [k for k, v in opt.state[p].items() if k != "step" and isinstance(v, torch.Tensor)]


def _replace_state(opt, ps):
    st = opt.state[_weights(ps)[4]]
    for name in _state_names(opt, _weights(ps)[4]):
        st[name] = st[name].clone()


def _swap_states(opt, ps):
    a, b = opt.state[_weights(ps)[0]], opt.state[_weights(ps)[1]]
    for name in _state_names(opt, _weights(ps)[0]):
        a[name], b[name] = b[name], a[name]


def _repoint_state(opt, ps):
    for name in _state_names(opt, _weights(ps)[2]):
        x = opt.state[_weights(ps)[2]][name]
        x.set_(x.clone())  # the same tensor object, other memory


def _edit_state(opt, ps):
    for name in _state_names(opt, _weights(ps)[1]):
        opt.state[_weights(ps)[1]][name].mul_(0.5)  # in place: the plan's views see it


def _reload(opt, ps):
    opt.load_state_dict(opt.state_dict())


CHANGES = {f.__name__[1:]: f for f in (_rebind, _transpose, _strided_grad, _freeze_one, _new_lr, _replace_state,
                                       _swap_states, _repoint_state, _edit_state, _reload)}


def _run(name, change, fused, plans=True, monkeypatch=None):
    model = _model(0, bias=name != "GroupAdaGrad")
    opt = getattr(ot, name)(model.parameters(), fused=fused, **{"lr": 0.01, **OPTIMIZERS[name]})
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(8)  # (SGLD's noise keys, from the default generator: alike for every run)
    ps = list(model.parameters())
    with pytest.MonkeyPatch.context() as mp:
        if not plans:
            mp.setattr(_large._LargePlan, "make", classmethod(lambda cls, *args: None))
        for step in range(5):
            _backward(model, gen)
            if step == 2:
                change(opt, ps)
            opt.step()
            opt.zero_grad()
    return model, opt


def _assert_equal(a, b, what):
    for (pa, pb) in zip(a[0].parameters(), b[0].parameters()):
        assert torch.equal(pa, pb), what
        sa, sb = a[1].state[pa], b[1].state[pb]
        assert sa.keys() == sb.keys()
        for key in sa:
            assert torch.equal(torch.as_tensor(sa[key]), torch.as_tensor(sb[key])), (what, key)


@pytest.mark.parametrize("change", sorted(CHANGES))
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_plans_change_nothing_whatever_changes_between_steps(name, change):
    planned = _run(name, CHANGES[change], None)
    if change != "transpose":  # (a strided weight has none)
        assert planned[1].mxnet_optimizer(0).__dict__.get("_large_plans")  # a plan was made (and kept)
    _assert_equal(planned, _run(name, CHANGES[change], None, plans=False), (name, change, "without plans"))
    if name in ELEMENTWISE:
        _assert_equal(planned, _run(name, CHANGES[change], False), (name, change, "reference path"))


@pytest.mark.parametrize("scheduled", [False, True], ids=["constant", "scheduled"])
def test_a_steady_step_places_no_tensor_one_by_one(monkeypatch, scheduled):
    """The plan is what steady steps use: no large tensor goes through ``_in_place`` again, also where a
    scheduler's new lr makes the group's MXNet-style optimizer anew at every step (the plans go over)."""
    model = _model(1)
    opt = ot.Adam(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t)) if scheduled else None
    gen = torch.Generator().manual_seed(0)
    calls = []
    real = _large._in_place
    monkeypatch.setattr(_large, "_in_place", lambda *args: calls.append(1) or real(*args))
    inners = []  # the objects themselves (ids of freed ones may be reused)
    for _ in range(4):
        _backward(model, gen)
        opt.step()
        if not any(x is opt.mxnet_optimizer(0) for x in inners):
            inners.append(opt.mxnet_optimizer(0))
        if sched is not None:
            sched.step()
    assert len(inners) == (4 if scheduled else 1)
    assert len(calls) == 5  # the first step's five large weights, then none


def test_a_changed_tensor_remakes_the_plan(monkeypatch):
    model = _model(2)
    opt = ot.SGD(model.parameters(), lr=0.01, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    calls = []
    real = _large._in_place
    monkeypatch.setattr(_large, "_in_place", lambda *args: calls.append(1) or real(*args))
    for step in range(4):
        _backward(model, gen)
        if step == 2:
            _replace_state(opt, list(model.parameters()))
        opt.step()
    assert len(calls) == 10  # placed one by one at the first step and after the replaced state


@pytest.mark.parametrize("name", ["Adam", "Nadam", "SGLD"])
def test_steady_steps_replay_the_recorded_calls_with_scalars_of_each_tensor(monkeypatch, name):
    """Nadam's schedule and SGLD's noise keys differ from tensor to tensor (a tuple of scalars per member of a
    call): the recorded calls are replayed all the same, with the reference path's numbers."""
    replays = []
    real = _large._LargePlan.replay
    monkeypatch.setattr(_large._LargePlan, "replay", lambda self, *a: replays.append(real(self, *a)) or replays[-1])

    def run(fused):
        model = _model(4)
        opt = getattr(ot, name)(model.parameters(), lr=1e-5 if name == "SGLD" else 0.01, fused=fused)
        gen = torch.Generator().manual_seed(5)
        torch.manual_seed(9)
        for _ in range(7):  # (Nadam's fp32 schedules of the five weights agree from the fourth step on)
            _backward(model, gen)
            opt.step()
        return model, opt

    planned = run(None)
    assert replays[-3:] == [True] * 3
    _assert_equal(planned, run(False), (name, "reference path"))


@pytest.mark.parametrize("name", ["LARS", "LAMB"])
def test_large_tensors_of_per_tensor_sums_run_alone_on_the_cpu(monkeypatch, name):
    """LARS's and LAMB's steps read a tensor twice (its sums, then its update): on the CPU a member of
    ``engine.ALONE`` elements or more runs in a call of its own, the smaller ones stay grouped. The numbers are
    those of the grouped calls bit for bit, through the replays of steady steps and a change between them."""
    monkeypatch.setattr(engine, "_COMPILED", {})
    steps = []
    real = engine._run_groups

    def spy(opt, key, members, tape=None):
        if key[1] == "norms":
            steps.append(len(members))
        return real(opt, key, members, tape)

    monkeypatch.setattr(engine, "_run_groups", spy)

    def run(alone):
        monkeypatch.setattr(engine, "ALONE", alone)
        torch.manual_seed(6)
        # three 256 x 256 weights (65,536 elements), two of 76,800 (300 x 256, 256 x 300); five small biases, packed
        sizes = (256, 256, 300, 256, 256, 256)
        model = torch.nn.Sequential(*(torch.nn.Linear(a, b) for a, b in zip(sizes, sizes[1:])))
        opt = getattr(ot, name)(model.parameters(), lr=0.01, **OPTIMIZERS[name])
        gen = torch.Generator().manual_seed(7)
        ps = list(model.parameters())
        for step in range(5):
            _backward(model, gen)
            if step == 3:
                _edit_state(opt, ps)
            opt.step()
        return model, opt

    grouped = run(1 << 40)
    assert steps[0] == 5  # the five weights in one call of _run_groups: a group of four and a padded one
    steps.clear()
    alone = run(70_000)
    assert steps[:4] == [5, 3, 1, 1]  # the five, then the three smaller ones grouped, the two larger alone
    _assert_equal(alone, grouped, (name, "alone against grouped"))
