"""The base class's bookkeeping (MXNet 1.9.1 §1) and the registry, on closed forms."""

import numpy as np
import pytest
import torch

from optzoo import lr_scheduler, optimizer
from optzoo.optimizer import registry


class Param:
    """A Gluon-like parameter: the base reads lr_mult / wd_mult live."""

    def __init__(self, lr_mult=1.0, wd_mult=1.0):
        self.lr_mult, self.wd_mult = lr_mult, wd_mult


def sgd_step(opt, index, w, g):
    opt.update(index, w, g, opt.create_state(index, w))


def test_update_counts_and_num_update():
    opt = optimizer.SGD(learning_rate=0.1, begin_num_update=3)
    w = torch.zeros(2)
    for index in [0, 0, 1, 0]:
        sgd_step(opt, index, w, torch.ones(2))
    assert opt._index_update_count == {0: 6, 1: 4}
    assert opt.num_update == 6


def test_counts_are_per_device_context():
    opt = optimizer.SGD()
    sgd_step(opt, 0, torch.zeros(1), torch.ones(1))
    opt._set_current_context(1)
    sgd_step(opt, 0, torch.zeros(1), torch.ones(1))
    assert opt._all_index_update_counts == {0: {0: 1}, 1: {0: 1}}


def test_learning_rate_property_and_setter():
    opt = optimizer.Optimizer(learning_rate=0.01)
    opt.set_learning_rate(0.2)
    assert opt.learning_rate == 0.2
    assert optimizer.Optimizer().learning_rate == 0.01  # MXNet's default when no scheduler
    sched = lr_scheduler.FactorScheduler(step=1, base_lr=1024)
    assert optimizer.Optimizer(lr_scheduler=sched).learning_rate == 1024
    with pytest.raises(UserWarning, match="LRScheduler"):
        optimizer.Optimizer(lr_scheduler=sched).set_learning_rate(0.1)


def test_explicit_learning_rate_overwrites_scheduler_base_lr_only():
    sched = lr_scheduler.FactorScheduler(step=1, base_lr=0.4)
    with pytest.warns(UserWarning, match="overwritten"):
        opt = optimizer.Optimizer(learning_rate=0.3, lr_scheduler=sched)
    assert sched.base_lr == 0.3 and opt.learning_rate == 0.3


def test_lr_and_wd_multipliers_priority():
    # param_dict beats lr_mult by index, which beats lr_mult by name; read live
    p = Param(lr_mult=0.5, wd_mult=3.0)
    opt = optimizer.SGD(learning_rate=0.1, wd=0.01, param_dict={0: p},
                        param_idx2name={0: "a_weight", 1: "b_bias", 2: "c_gamma", 3: "d_weight"})
    opt.set_lr_mult({1: 2.0, "b_bias": 7.0, "c_gamma": 4.0})
    opt.set_wd_mult({"d_weight": 5.0})
    assert opt._get_lrs([0, 1, 2, 3, 9]) == pytest.approx([0.05, 0.2, 0.4, 0.1, 0.1])
    # name rule: b_bias (not _weight/_gamma) gets 0; param_dict wins for index 0
    assert opt._get_wds([0, 1, 2, 3]) == pytest.approx([0.03, 0.0, 0.01, 0.05])
    p.lr_mult = 2.0
    assert opt._get_lr(0) == pytest.approx(0.2)


def test_name_rule_only_with_idx2name():
    opt = optimizer.SGD(wd=0.1)
    assert opt.wd_mult == {} and opt._get_wd(0) == 0.1
    opt = optimizer.SGD(wd=0.1, param_idx2name={0: "fc_bias", 1: "bn_beta", 2: "bn_moving_mean"})
    assert opt.wd_mult == {"fc_bias": 0.0, "bn_beta": 0.0, "bn_moving_mean": 0.0}


def test_scheduler_sees_count_after_increment():
    seen = []

    class Recorder(lr_scheduler.LRScheduler):
        def __call__(self, num_update):
            seen.append(num_update)
            return 0.1

    opt = optimizer.SGD(lr_scheduler=Recorder())
    for _ in range(3):
        sgd_step(opt, 0, torch.zeros(1), torch.ones(1))
    assert seen == [1, 2, 3]


def test_sgd_closed_form_with_momentum_wd_clip():
    # mom = mu*mom - lr*wd*w - lr*clip(rg*g); w += mom, two steps by hand
    opt = optimizer.SGD(learning_rate=0.1, momentum=0.9, wd=0.01, rescale_grad=0.5, clip_gradient=0.3)
    w = torch.tensor([1.0, -2.0], dtype=torch.float64)
    g = torch.tensor([2.0, 0.2], dtype=torch.float64)
    state = opt.create_state(0, w)
    mom, ww = [0.0, 0.0], [1.0, -2.0]
    # MXNet's kernel holds the hyperparameters as fp32 values, also for fp64 weights
    lr, wd, mu, rg, c = (float(np.float32(x)) for x in (0.1, 0.01, 0.9, 0.5, 0.3))
    for _ in range(2):
        opt.update(0, w, g, state)
        for k in range(2):
            G = max(min(rg * g[k].item(), c), -c)
            mom[k] = mu * mom[k] - lr * wd * ww[k] - lr * G
            ww[k] += mom[k]
    assert w.tolist() == pytest.approx(ww, rel=1e-12)
    assert state.tolist() == pytest.approx(mom, rel=1e-12)


def test_base_never_mutates_the_gradient():
    for name in optimizer.list_optimizers():
        opt = optimizer.create(name)
        w, g = torch.randn(3, 4), torch.randn(3, 4)
        g0 = g.clone()
        opt.update(0, w, g, opt.create_state(0, w))
        assert torch.equal(g, g0), name


# ---------------------------------------------------------------------------------------------- registry
def test_create_is_case_insensitive_and_alias():
    assert type(optimizer.create("ADAM")) is optimizer.Adam
    assert type(optimizer.create("ccsgd")) is optimizer.SGD
    assert type(optimizer.Optimizer.create_optimizer("Sgd", momentum=0.5)) is optimizer.SGD


def test_unknown_name_lists_known_ones():
    with pytest.raises(ValueError, match="Cannot find optimizer 'adamw'.*adam.*sgd"):
        optimizer.create("adamw")


def test_unknown_keyword_is_a_type_error_naming_it():
    with pytest.raises(TypeError, match="'learningrate'"):
        optimizer.create("adam", learningrate=0.1)


def test_records_have_description_and_capabilities():
    for rec in registry.records():
        assert rec.description and rec.name == rec.name.lower()
        assert isinstance(rec.capabilities, frozenset)
    assert "ccsgd" in registry.get_record("sgd").aliases
    assert registry.get_record("adam").defaults()["beta1"] == 0.9


@pytest.fixture
def scratch_registry(monkeypatch):
    monkeypatch.setattr(registry, "_RECORDS", dict(registry._RECORDS))
    monkeypatch.setattr(registry, "_NAMES", dict(registry._NAMES))


def test_tutorial_custom_optimizer(scratch_registry):
    """The tutorial's "Custom Optimizer" section: override __init__, create_state, update; @register."""

    @optimizer.register
    class MySGD(optimizer.Optimizer):
        def __init__(self, momentum=0.5, **kwargs):
            super().__init__(**kwargs)
            self.momentum = momentum

        def create_state(self, index, weight):
            return torch.zeros_like(weight)

        def update(self, index, weight, grad, state):
            self._update_count(index)
            lr = self._get_lr(index)
            state.mul_(self.momentum).add_(grad * self.rescale_grad, alpha=-lr)
            weight.add_(state)

    opt = optimizer.create("mysgd", learning_rate=0.1)
    assert "mysgd" in optimizer.list_optimizers()
    w, g = torch.ones(3), torch.full((3,), 2.0)
    updater = optimizer.get_updater(opt)
    updater(0, g, w)
    updater(0, g, w)
    # v1 = -0.2, w1 = 0.8; v2 = -0.1 - 0.2 = -0.3, w2 = 0.5
    assert w.tolist() == pytest.approx([0.5] * 3)
    # multi-precision comes for free from the base class
    opt = optimizer.create("mysgd", learning_rate=0.1, multi_precision=True)
    w16 = torch.ones(3, dtype=torch.float16)
    state = opt.create_state_multi_precision(0, w16)
    opt.update_multi_precision(0, w16, torch.full((3,), 2.0, dtype=torch.float16), state)
    assert state[0].dtype == torch.float32 and w16.tolist() == pytest.approx([0.8] * 3, abs=1e-3)
    with pytest.warns(UserWarning, match="overriding"):
        optimizer.register(MySGD)


def test_register_rejects_non_optimizers():
    with pytest.raises(TypeError, match="subclass"):
        optimizer.register(dict)
