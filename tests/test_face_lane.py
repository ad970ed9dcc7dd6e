"""The torch face's steady-state lane (``OptzooOptimizer._lane``): a param group keeps the executor's plan of its
parameters (the large ones updated in place by compiled calls that later steps replay, the pack of the small
ones) from step to step. Whatever the user changes between steps (re-bound or transposed parameters, re-bound
gradients, frozen parameters, new hyperparameters, replaced states, a reloaded state dict), the result equals the
reference path (``fused=False``, one update per parameter) bit for bit, on the default layout and on
``flatten_parameters``' flat one, with small tensors only and with large ones; a wrong gradient is refused with
nothing changed."""
import pytest
import torch

import optzoo.torch as ot
from optzoo.optimizer import engine

OPTIMIZERS = {"Adam": {}, "SGD": {"momentum": 0.9, "wd": 1e-3}, "Nadam": {}, "RMSProp": {"centered": True},
              "LAMB": {}, "SGLD": {}}


def _model(seed):
    torch.manual_seed(seed)
    # a square weight (5 x 5) for the transposed re-binding; 6 parameters: one pack
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 5), torch.nn.Linear(5, 2))


def _backward(model, gen):
    model(torch.randn(4, 6, generator=gen)).square().sum().backward()


def _rebind(opt, ps):
    ps[0].data = ps[0].detach().clone()


def _transpose(opt, ps):
    ps[2].data = ps[2].detach().t()  # the same address and shape, other strides


def _freeze_one(opt, ps):
    ps[1].grad = None


def _new_lr(opt, ps):
    opt.param_groups[0]["lr"] *= 0.5


def _replace_state(opt, ps):
    st = opt.state[ps[3]]
    for name in [k for k, v in st.items() if k != "step" and isinstance(v, torch.Tensor)][:1]:  # (SGLD: none)
        st[name] = st[name].clone()


def _rebind_grad(opt, ps):
    ps[4].grad = ps[4].grad.clone()


def _reload(opt, ps):
    opt.load_state_dict(opt.state_dict())


CHANGES = {f.__name__[1:]: f for f in (_rebind, _transpose, _freeze_one, _new_lr, _replace_state, _rebind_grad,
                                       _reload)}


def _run(name, change, flat):
    """Twin models, one stepped by the lane (``fused=None``; flat layout if asked), one by the reference path;
    ``change`` applied to both after two steps (between backward and step, as a user would)."""
    models = {"lane": _model(0), "ref": _model(0)}
    if flat:
        ot.flatten_parameters(models["lane"].parameters())
    opts = {k: getattr(ot, name)(m.parameters(), lr=0.01, fused=None if k == "lane" else False,
                                 **OPTIMIZERS[name]) for k, m in models.items()}
    for k, model in models.items():
        gen = torch.Generator().manual_seed(3)
        torch.manual_seed(8)  # (SGLD's noise keys, drawn from the default generator: alike for both)
        ps = list(model.parameters())
        for step in range(5):
            _backward(model, gen)
            if step == 2:
                change(opts[k], ps)
            opts[k].step()
            opts[k].zero_grad(set_to_none=not flat)
    return models, opts


@pytest.fixture(params=["small", "large"])
def sizes(request, monkeypatch):
    """``large``: the weights (10 to 30 elements) count as large tensors (updated in place by compiled calls that
    later steps replay), the biases stay small (a pack)."""
    if request.param == "large":
        monkeypatch.setattr(engine, "LARGE", 10)
    return request.param


@pytest.mark.parametrize("flat", [False, True], ids=["default", "flat"])
@pytest.mark.parametrize("change", sorted(CHANGES))
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_lane_equals_the_reference_path_whatever_changes_between_steps(name, change, flat, sizes):
    if sizes == "large" and name == "LAMB":
        pytest.skip("compiled per-tensor norms are not the reference path's bits (tests/test_two_phase.py)")
    models, opts = _run(name, CHANGES[change], flat)
    lanes = opts["lane"]._lanes.values()
    assert any(lane.plan is not None for lane in lanes)  # the lane ran
    if sizes == "large":
        assert [len(lane.plan.large) for lane in lanes if lane.plan is not None] == [3]
    for a, b in zip(models["lane"].parameters(), models["ref"].parameters()):
        assert torch.equal(a, b), (name, change)
        assert a.stride() == b.stride()
        sa, sb = opts["lane"].state[a], opts["ref"].state[b]
        assert sa.keys() == sb.keys()
        for key in sa:
            assert torch.equal(torch.as_tensor(sa[key]), torch.as_tensor(sb[key])), (name, change, key)


def test_transposed_parameter_leaves_the_flat_buffer_view():
    """A square weight re-bound to its transpose keeps its address and shape: the lane's remembered view of
    the flat buffer must not be used for it (the parameter's elements are no longer in that order)."""
    models, opts = _run("SGD", _transpose, flat=True)
    w_lane, w_ref = list(models["lane"].parameters())[2], list(models["ref"].parameters())[2]
    assert not w_lane.is_contiguous() and torch.equal(w_lane, w_ref)


def test_a_wrong_gradient_is_refused_and_nothing_changes():
    model = _model(1)
    opt = ot.Adam(model.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        _backward(model, gen)
        opt.step()
    assert opt._lanes  # the lane is set up
    _backward(model, gen)
    ps = list(model.parameters())
    ps[3].grad.data = torch.zeros(7)  # not the parameter's shape
    before = ([p.detach().clone() for p in ps],
              {id(p): {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in opt.state[p].items()}
               for p in ps})
    with pytest.raises(ValueError, match="shape"):
        opt.step()
    for p, w in zip(ps, before[0]):
        assert torch.equal(p, w)
        for k, v in opt.state[p].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(before[1][id(p)][k]))


def test_frozen_parameters_get_no_state_in_the_lane():
    model = _model(2)
    model[0].weight.requires_grad_(False)
    opt = ot.Adam(model.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        _backward(model, gen)
        opt.step()
        opt.zero_grad()
    assert model[0].weight not in opt.state or not opt.state[model[0].weight]
    assert [lane.indices for lane in opt._lanes.values()] == [[1, 2, 3, 4, 5]]


def test_a_group_with_a_large_tensor_among_small_ones_keeps_its_plan_and_still_checks():
    """A large tensor among small ones: the lane's plan updates it in place and packs the others, equal to the
    reference path, and still refuses a wrong gradient."""
    def make(fused):
        torch.manual_seed(4)
        ps = [torch.nn.Parameter(torch.randn(n)) for n in (1 << 16, 8, 8, 8, 8)]
        return ps, ot.Adam(ps, lr=0.01, fused=fused)
    (ps, opt), (ref_ps, ref) = make(None), make(False)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=gen) for p in ps]
        for p, q, g in zip(ps, ref_ps, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    assert [(lane.plan.large, lane.plan.small) for lane in opt._lanes.values()] == [([0], [1, 2, 3, 4])]
    for p, q in zip(ps, ref_ps):
        assert torch.equal(p, q)
    ps[2].grad.data = torch.zeros(3)  # torch's .grad setter refuses this; .data does not
    with pytest.raises(ValueError, match="shape"):
        opt.step()


@pytest.mark.parametrize("name", ["Adam", "SGD", "LAMB", "Nadam"])
def test_a_scheduler_changing_lr_every_step_keeps_the_lane_and_equals_the_reference_path(name):
    """Under a scheduler the group's MXNet-style optimizer is rebuilt at every step (new lr): it takes the old
    one's caches and the group keeps its lane (the same pack object), with the reference path's numbers."""
    models = {"lane": _model(5), "ref": _model(5)}
    opts = {k: getattr(ot, name)(m.parameters(), lr=0.01, fused=None if k == "lane" else False, **OPTIMIZERS[name])
            for k, m in models.items()}
    packs = []
    for k, model in models.items():
        sched = torch.optim.lr_scheduler.LambdaLR(opts[k], lambda step: 1.0 / (1 + step))
        gen = torch.Generator().manual_seed(2)
        for _ in range(6):
            _backward(model, gen)
            opts[k].step()
            sched.step()
            opts[k].zero_grad()
            if k == "lane":
                packs.append(next(iter(opts[k]._lanes.values())).plan)
    assert packs[1] is not None and all(p is packs[1] for p in packs[1:])
    for a, b in zip(models["lane"].parameters(), models["ref"].parameters()):
        assert torch.equal(a, b), name
        for key in opts["lane"].state[a]:
            assert torch.equal(torch.as_tensor(opts["lane"].state[a][key]),
                               torch.as_tensor(opts["ref"].state[b][key])), (name, key)


def test_a_change_of_state_structure_rebuilds_the_lane():
    """Hyperparameters that change the state's structure (RMSProp's ``centered``) give the rebuilt optimizer a
    lineage of its own: the lane and the layouts are made anew, never taken from the old structure."""
    model = _model(6)
    opt = ot.RMSProp(model.parameters(), lr=0.01)
    inner = opt.mxnet_optimizer()
    opt.param_groups[0]["lr"] = 0.02
    assert opt.mxnet_optimizer()._lineage is inner._lineage
    opt.param_groups[0]["centered"] = True
    assert opt.mxnet_optimizer()._lineage is not inner._lineage
    assert "_face_layouts" not in opt.mxnet_optimizer().__dict__ or \
        opt.mxnet_optimizer().__dict__["_face_layouts"] is not inner.__dict__.get("_face_layouts")


@pytest.mark.parametrize("sizes", [(5000,), (3000, 2000), (8, 5000, 3000)], ids=["one", "two", "three"])
@pytest.mark.parametrize("name, kw", [("LAMB", {}), ("LARS", {"momentum": 0.9}), ("Adam", {}),
                                      ("SGD", {"momentum": 0.9}), ("SGLD", {})])
def test_a_group_of_a_few_small_parameters_equals_the_reference_path(name, kw, sizes):
    """Groups of fewer than four parameters take the lane too; with no large tensor and no flag their steady steps
    run each parameter's eager kernel as the first step did (a compiled pack of them would sum LAMB's and LARS's
    norms in another order than the first step and the reference path), except that an elementwise kernel's
    tensors of 4,096 elements or more are updated in place by its compiled kernel (the same bits)."""
    def run(fused):
        gen = torch.Generator().manual_seed(6)
        torch.manual_seed(7)
        ps = [torch.nn.Parameter(torch.randn(n, generator=gen)) for n in sizes]
        opt = getattr(ot, name)(ps, lr=0.01, fused=fused, **kw)
        for _ in range(4):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        return ps, opt
    (ps, opt), (ref, _) = run(None), run(False)
    plans = [lane.plan for lane in opt._lanes.values()]
    assert len(plans) == 1 and plans[0] is not None
    in_place = [k for k, n in enumerate(sizes) if n >= engine.PACK_COMPILED and name not in ("LAMB", "LARS")]
    assert plans[0].large == in_place
    for p, q in zip(ps, ref):
        assert torch.equal(p, q), name
