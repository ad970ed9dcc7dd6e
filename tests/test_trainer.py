"""optzoo.Trainer: Gluon 1.9.1 semantics (reference §6) on closed forms, and its agreement with the torch face."""
import warnings

import pytest
import torch

import optzoo
import optzoo.torch as ot
from optzoo import lr_scheduler, optimizer


def mlp(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3)).to(dtype)


def batches(n, seed=1, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 6, generator=gen, dtype=dtype), torch.randint(0, 3, (4,), generator=gen))
            for _ in range(n)]


def test_gluon_trainer_closed_form_with_lr_mult():
    """MXNet's test_gluon_trainer on one device: sgd lr=1, momentum .5, grad 1 -> w=-1; lr_mult .5 -> w=-2."""
    x = torch.nn.Parameter(torch.zeros(10))
    trainer = optzoo.Trainer({"x": x}, "sgd", {"learning_rate": 1.0, "momentum": 0.5})
    x.grad = torch.ones(10)
    trainer.step(1)
    assert x.detach().tolist() == [-1.0] * 10
    trainer.set_lr_mult({"x": 0.5})
    x.grad = torch.ones(10)
    trainer.step(1)
    assert x.detach().tolist() == [-2.0] * 10   # mom = .5*(-1) - .5*1 = -1


def test_step_rescales_by_batch_size_and_update_after_allreduce():
    w = torch.nn.Parameter(torch.zeros(3))
    trainer = optzoo.Trainer([w], "sgd", {"learning_rate": 0.1, "rescale_grad": 2.0})
    w.grad = torch.full((3,), 4.0)
    trainer.step(8)                             # rescale = 2/8
    assert w.detach().tolist() == pytest.approx([-0.1] * 3)
    w.grad = torch.full((3,), 4.0)
    trainer.allreduce_grads()
    trainer.update(4)                           # rescale = 2/4
    assert w.detach().tolist() == pytest.approx([-0.3] * 3)
    with pytest.raises(ValueError, match="batch_size=0"):
        trainer.step(0)


def test_trainer_lr_scheduler_like_mxnet():
    """MXNet's test_trainer_lr_sched: FactorScheduler(2, .1, base_lr=1): lr 1, .1, .01 after steps 0, 2, 4."""
    w = torch.nn.Parameter(torch.zeros(1))
    sched = lr_scheduler.FactorScheduler(2, 0.1, base_lr=1)
    trainer = optzoo.Trainer([w], "sgd", {"learning_rate": 1, "lr_scheduler": sched})
    lrs = []
    for i in range(6):
        w.grad = torch.ones(1)
        trainer.step(1)
        if i % 2 == 0:
            lrs.append(trainer.learning_rate)
    assert lrs == pytest.approx([1, 0.1, 0.01])
    with pytest.raises(UserWarning, match="LRScheduler"):
        trainer.set_learning_rate(0.5)


def test_wd_mult_by_pattern_no_decay_on_biases():
    model = mlp()
    trainer = optzoo.Trainer(model.named_parameters(), "sgd", {"learning_rate": 0.1, "wd": 0.5})
    trainer.set_wd_mult({"*.bias": 0.0})
    assert trainer.wd_mult == {"0.weight": 1.0, "0.bias": 0.0, "2.weight": 1.0, "2.bias": 0.0}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    trainer.step(1)
    for n, p in model.named_parameters():
        factor = 1.0 if n.endswith("bias") else 1 - 0.1 * 0.5   # w = (1 - lr*wd)*w
        torch.testing.assert_close(p.detach(), before[n] * factor)
    with pytest.raises(KeyError, match="'nope' matches no parameter"):
        trainer.set_wd_mult({"nope": 0.0})


def test_parameter_order_and_names():
    a, b, c = (torch.nn.Parameter(torch.zeros(1)) for _ in range(3))
    t = optzoo.Trainer({"zeta": a, "alpha": b, "mid": c}, "sgd")
    assert t._names == ["alpha", "mid", "zeta"]           # a dict is ordered by name, as a ParameterDict
    assert optzoo.Trainer([a, b], "sgd")._names == ["0", "1"]
    with pytest.raises(ValueError, match="appears twice"):
        optzoo.Trainer([a, a], "sgd")
    with pytest.raises(TypeError, match="params\\[0\\]"):
        optzoo.Trainer([1.0], "sgd")


def test_constructor_errors():
    p = [torch.nn.Parameter(torch.zeros(1))]
    with pytest.raises(ValueError, match="optimizer_params=.*must be empty"):
        optzoo.Trainer(p, optimizer.SGD(), {"learning_rate": 0.1})
    with pytest.raises(ValueError, match="kvstore='bogus'"):
        optzoo.Trainer(p, "sgd", kvstore="bogus")
    with pytest.raises(NotImplementedError, match="kvstore='nccl' is not supported"):
        optzoo.Trainer(p, "sgd", kvstore="nccl")
    with pytest.raises(ValueError, match="Cannot find optimizer 'nadamw'"):
        optzoo.Trainer(p, "nadamw")


def test_instance_optimizer_gets_the_param_dict():
    w = torch.nn.Parameter(torch.ones(2))
    opt = optimizer.SGD(learning_rate=0.1, wd=1.0)
    trainer = optzoo.Trainer({"w": w}, opt)
    trainer.set_wd_mult({"w": 0.0})
    w.grad = torch.zeros(2)
    trainer.step(1)
    assert trainer.optimizer is opt and w.detach().tolist() == [1.0, 1.0]


def test_stale_gradients_warn_and_are_neither_updated_nor_counted():
    used, unused = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    frozen = torch.nn.Parameter(torch.ones(2), requires_grad=False)
    trainer = optzoo.Trainer({"used": used, "unused": unused, "frozen": frozen}, "sgd", {"learning_rate": 0.1})
    used.sum().backward()
    with pytest.warns(UserWarning, match="'unused'"):
        trainer.step(1)
    assert unused.detach().tolist() == [1.0, 1.0] and used.detach().tolist() == pytest.approx([0.9, 0.9])
    # no backward since the last step: the gradient is stale even though it is still there
    with pytest.warns(UserWarning, match="'unused', 'used'"):
        trainer.step(1)
    assert used.detach().tolist() == pytest.approx([0.9, 0.9])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer.step(1, ignore_stale_grad=True)
    assert trainer.optimizer._index_update_count == {trainer._index["used"]: 1}
    used.grad = None
    (used * 2).sum().backward()
    trainer.step(1, ignore_stale_grad=True)
    assert used.detach().tolist() == pytest.approx([0.7, 0.7])


def test_a_gradient_accumulated_into_the_same_tensor_is_fresh():
    """Gluon's fresh-gradient mark: backward accumulating into the ``.grad`` tensor the last step saw (no
    ``zero_grad``) makes it fresh again, by the accumulation hook, though the object is the same."""
    w = torch.nn.Parameter(torch.ones(2))
    trainer = optzoo.Trainer({"w": w}, "sgd", {"learning_rate": 0.1})
    w.sum().backward()
    trainer.step(1)
    grad = w.grad
    w.sum().backward()  # accumulates: the same tensor, now 2
    assert w.grad is grad
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer.step(1)
    assert w.detach().tolist() == pytest.approx([0.7, 0.7])  # 1 - 0.1 * 1 - 0.1 * 2


@pytest.mark.parametrize("name,params", [("nag", {"momentum": 0.9, "wd": 1e-4}),
                                         ("adam", {"wd": 1e-3, "clip_gradient": 0.5}),
                                         ("lamb", {"wd": 1e-2}), ("ftml", {})])
def test_trainer_equals_torch_face(name, params):
    """One implementation: Trainer.step(batch) == torch face with rescale_grad = 1/batch, bit for bit."""
    data = batches(5)
    m1, m2 = mlp(), mlp()
    trainer = optzoo.Trainer(m1.named_parameters(), name, dict(params, learning_rate=0.01))
    face = ot.create(name, m2.parameters(), learning_rate=0.01, rescale_grad=1 / 4, **params)
    for x, y in data:
        torch.nn.functional.cross_entropy(m1(x), y, reduction="sum").backward()
        trainer.step(batch_size=x.shape[0])
        m1.zero_grad()
        torch.nn.functional.cross_entropy(m2(x), y, reduction="sum").backward()
        face.step()
        face.zero_grad()
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)
