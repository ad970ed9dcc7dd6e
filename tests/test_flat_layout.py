"""The opt-in flat, owning layout (``optzoo.torch.flatten_parameters``): the same numbers as your own
tensors, updated in place in one buffer (no scratch copies), and still right when you re-bind a parameter."""
import torch

import optzoo.torch as ot


def _model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3), torch.nn.Linear(3, 2))


def _train(model, opt, steps, set_to_none):
    gen = torch.Generator().manual_seed(7)
    for _ in range(steps):
        x = torch.randn(4, 6, generator=gen)
        model(x).square().sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=set_to_none)


def test_flat_layout_equals_the_default_layout_bit_for_bit():
    for name in ("Adam", "SGD", "LAMB", "FTML"):
        plain, flat = _model(0), _model(0)
        ot.flatten_parameters(flat.parameters())
        storages = {p.untyped_storage().data_ptr() for p in flat.parameters()}
        assert len(storages) == 1
        kwargs = {"momentum": 0.9} if name == "SGD" else {}
        opt_plain = getattr(ot, name)(plain.parameters(), lr=0.01, **kwargs)
        opt_flat = getattr(ot, name)(flat.parameters(), lr=0.01, **kwargs)
        _train(plain, opt_plain, 5, set_to_none=True)
        _train(flat, opt_flat, 5, set_to_none=False)
        for a, b in zip(plain.parameters(), flat.parameters()):
            assert torch.equal(a, b), name
        # still one buffer, gradients still its views, and the packed step ran in place: no scratch copies
        assert {p.untyped_storage().data_ptr() for p in flat.parameters()} == storages
        assert len({p.grad.untyped_storage().data_ptr() for p in flat.parameters()}) == 1
        assert "_scratch" not in opt_flat.mxnet_optimizer().__dict__, name
        assert "_scratch" in opt_plain.mxnet_optimizer().__dict__, name


def test_rebinding_after_flattening_stays_right():
    """``p.data = ...`` after flattening: the parameter leaves the buffer, and the step still updates it."""
    plain, flat = _model(1), _model(1)
    ot.flatten_parameters(flat.parameters())
    first = next(flat.parameters())
    first.data = first.detach().clone()
    opt_plain = ot.Adam(plain.parameters(), lr=0.01)
    opt_flat = ot.Adam(flat.parameters(), lr=0.01)
    _train(plain, opt_plain, 3, set_to_none=True)
    _train(flat, opt_flat, 3, set_to_none=True)  # gradients become ordinary tensors: copied, still right
    for a, b in zip(plain.parameters(), flat.parameters()):
        assert torch.equal(a, b)


def test_frozen_parameters_are_left_alone():
    model = _model(2)
    frozen = model[0].weight
    frozen.requires_grad_(False)
    before = frozen.untyped_storage().data_ptr()
    ot.flatten_parameters(model.parameters())
    assert frozen.untyped_storage().data_ptr() == before and frozen.grad is None
