"""The executor's kept scratch buffers (packs of small tensors): reused between steps, never shared between
different packs, never pickled, and the numbers those of a fresh optimizer on every step."""
import copy
import pickle

import pytest
import torch

import optzoo.torch as ot
from optzoo.optimizer import create


def _params(shapes, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]


def _grads(params, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)


def test_packs_of_different_shapes_share_no_scratch():
    """Two groups of small parameters, stepped alternately with fresh gradients, equal the reference path
    (fused=False: one update per parameter, no packing) bit for bit at every step."""
    shapes_a, shapes_b = [(3, 4), (5,), (2, 2, 2), (7,)], [(6,), (1, 9), (4,), (4,), (3,)]
    fast = [_params(shapes_a, 0), _params(shapes_b, 1)]
    ref = [[torch.nn.Parameter(p.detach().clone()) for p in ps] for ps in fast]
    opt = ot.Adam([{"params": fast[0]}, {"params": fast[1], "lr": 0.01}], lr=0.1)
    ref_opt = ot.Adam([{"params": ref[0]}, {"params": ref[1], "lr": 0.01}], lr=0.1, fused=False)
    for step in range(4):
        for k, ps in enumerate(fast + ref):
            _grads(ps, 100 * step + k % 2)
        opt.step()
        ref_opt.step()
        for a, b in zip(fast[0] + fast[1], ref[0] + ref[1]):
            assert torch.equal(a, b), f"step {step}"
    inner = opt.mxnet_optimizer(0)
    assert "_scratch" in inner.__dict__  # the pack path ran, with kept buffers
    for p in fast[0]:  # the user's parameters own their storage: not views of a scratch buffer
        assert p._base is None


def test_scratch_is_not_pickled_or_deep_copied_as_state():
    opt = create("sgd", learning_rate=0.1, momentum=0.9)
    weights = [torch.randn(8) for _ in range(6)]
    grads = [torch.randn(8) for _ in range(6)]
    states = [opt.create_state(i, w) for i, w in enumerate(weights)]
    opt.update(list(range(6)), weights, grads, states)
    assert "_scratch" in opt.__dict__
    assert "_scratch" not in pickle.loads(pickle.dumps(opt)).__dict__
    assert "_scratch" not in copy.deepcopy(opt).__dict__


def _replace_in_dict(opt, p, name):
    opt.state[p][name] = opt.state[p][name].clone() * 0.5


def _repoint(opt, p, name):
    opt.state[p][name].set_(opt.state[p][name].clone() * 0.5)


def _edit_in_place(opt, p, name):
    opt.state[p][name].mul_(0.5)


@pytest.mark.parametrize("change", [_replace_in_dict, _repoint, _edit_in_place], ids=lambda f: f.__name__[1:])
def test_remembered_pack_states_follow_a_changed_state(change):
    """A pack's states, joined once and remembered between steps, follow a state the user changes between
    steps (a new tensor in ``opt.state[p]``, one re-pointed by ``set_``, one edited in place): every step
    equals the reference path (fused=False, no packs) given the same change."""
    shapes = [(5,), (3, 4), (7,), (2, 3), (6,)]
    fast = _params(shapes, 2)
    ref = [torch.nn.Parameter(p.detach().clone()) for p in fast]
    opt, ref_opt = ot.Adam(fast, lr=0.1), ot.Adam(ref, lr=0.1, fused=False)
    for step in range(5):
        _grads(fast, step)
        _grads(ref, step)
        if step == 3:
            for o, ps in ((opt, fast), (ref_opt, ref)):
                change(o, ps[2], "mean")
                change(o, ps[2], "var")
        opt.step()
        ref_opt.step()
        for a, b in zip(fast, ref):
            assert torch.equal(a, b), f"step {step}"
        for a, b in zip(fast, ref):
            assert torch.equal(opt.state[a]["mean"], ref_opt.state[b]["mean"]), f"step {step}"
        if step == 2:  # the remembered joins are in use when the change comes
            assert opt.mxnet_optimizer(0).__dict__.get("_joined_states")


def test_one_dimensional_packs_copied_in_by_one_cat_equal_the_reference():
    """Packs of 1-D parameters (copied into the scratch buffers by one ``torch.cat``), one of them strided,
    with gradients of their own strides: every step equals the reference path bit for bit."""
    gen = torch.Generator().manual_seed(3)
    fast = [torch.nn.Parameter(torch.randn(n, generator=gen)) for n in (5, 9, 1, 12)]
    fast.append(torch.nn.Parameter(torch.randn(14, generator=gen)[::2]))  # strided storage
    ref = [torch.nn.Parameter(p.detach().clone()) for p in fast]
    opt, ref_opt = ot.SGD(fast, lr=0.1, momentum=0.9), ot.SGD(ref, lr=0.1, momentum=0.9, fused=False)
    for step in range(3):
        for k, (a, b) in enumerate(zip(fast, ref)):
            g = torch.randn(2 * a.numel(), generator=gen)[::2] if k % 2 else torch.randn(a.numel(), generator=gen)
            a.grad, b.grad = g, g.clone()
        opt.step()
        ref_opt.step()
        for a, b in zip(fast, ref):
            assert torch.equal(a, b), f"step {step}"
    assert fast[4].stride() == (2,)  # still the user's strided tensor
    (entry,) = opt.mxnet_optimizer(0).__dict__["_scratch"].values()
    assert entry[-1] is True  # the pack took the one-cat copy


def test_mxnet_style_updates_keep_the_pack_of_the_small_tensors_among_large_ones():
    """The MXNet-style ``update`` (the Trainer's) over large and small tensors keeps the small ones' Pack from call
    to call (one per shape pattern), runs it before the large ones, and updates a large weight with no flat form
    (re-bound to a transposed layout) after them: the reference path's numbers at every step."""
    shapes = [(300, 300), (8,), (3, 5), (8,), (256, 256)]

    def run(fused, between=None):
        opt = create("adam", learning_rate=0.01)
        opt._fused = fused
        weights = [p.detach() for p in _params(shapes, 0)]
        states = [opt.create_state(i, w) for i, w in enumerate(weights)]
        for step in range(4):
            if between is not None:
                between(weights, step)
            gen = torch.Generator().manual_seed(step)
            opt.update(list(range(5)), weights, [torch.randn(w.shape, generator=gen) for w in weights], states)
        return opt, weights

    def transpose(weights, step):
        if step == 2:
            weights[4].data = weights[4].t().contiguous().t()  # the same values, column-major: no flat form

    for between in (None, transpose):
        opt, fast = run(None, between)
        _, ref = run(False, between)
        assert all(torch.equal(a, b) for a, b in zip(fast, ref))
        packs = list(opt.__dict__["_packs"].values())
        assert len(packs) == 1 and packs[0].segs.sizes == [8, 15, 8]  # (a lone large weight runs by itself)
