"""The executor's kept scratch buffers (packs of small tensors): reused between steps, never shared between
different packs, never pickled, and the numbers those of a fresh optimizer on every step."""
import copy
import pickle

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
