"""Two-phase rules (LAMB) on the CPU: large tensors run as two compiled loops with the direction stored in a kept
buffer, four per call (a last, shorter group filled up with small stand-ins: one pair of graphs; a lone tensor
alone). Their numbers are the one-graph compiled step's bit for bit, and the reference path's within the compiled
norms' bound; the buffers are one per place in a call, each sized to the largest tensor it held, in memory of
its own (so the calls may be direct ones), and kept through a scheduler's rebuild."""
import pytest
import torch

import optzoo.torch as ot
from optzoo.optimizer import _direct, _phases, engine
from optzoo.optimizer._tree import leaves
from optzoo.optimizer.lamb import LAMB
from test_fast_path import BUCKET_NORM_RTOL, assert_match

#: 9 large tensors (groups of 4, 4 and 1 + 3 stand-ins), two of one size, and a small one (packed)
SHAPES = [(40, 3), (17,), (40, 3), (9, 5), (33,), (6, 7), (50,), (21,), (13, 2), (3,)]
VARIANTS = [{}, {"bias_correction": False}, {"lower_bound": 0.1, "upper_bound": 2.0}]


@pytest.fixture(autouse=True)
def small_large(monkeypatch):
    monkeypatch.setattr(engine, "LARGE", 12)  # the tensors above count as large: in place, compiled


def run(fused, dtype=torch.float32, steps=3, **kw):
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in SHAPES]
    opt = ot.LAMB(params, lr=0.01, weight_decay=0.01, fused=fused, **kw)
    ptrs = [p.data_ptr() for p in params]
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(dtype)
        opt.step()
    assert [p.data_ptr() for p in params] == ptrs  # updated in place
    mx = opt.mxnet_optimizer(0)
    return [p.detach().clone() for p in params] + [t.clone() for p in params for t in leaves(opt.mx_state(p))], mx


def one_graph(monkeypatch, *args, **kw):
    with monkeypatch.context() as m:
        m.setattr(LAMB, "_two_phase", False)
        return run(*args, **kw)[0]


@pytest.mark.parametrize("variant", VARIANTS, ids=["default", "no_bias_correction", "bounds"])
def test_two_phases_equal_the_one_graph_step_and_the_reference_path(variant, monkeypatch):
    fused = None
    calls, real, replay = [], engine._run, _direct.Replay.run

    def spy(compiled, key, *args, **kw):
        if "phases" in key and key[-1] == "first":
            calls.append(key[-3])  # the chunk's length
        return real(compiled, key, *args, **kw)

    def replayed(self, opt, args):  # (a step over the same tensors as the last one replays its calls)
        if "phases" in self.key and self.key[-1] == "first":
            calls.append(self.key[-3])
        return replay(self, opt, args)

    monkeypatch.setattr(engine, "_run", spy)
    monkeypatch.setattr(_direct.Replay, "run", replayed)
    got, _ = run(fused, **variant)
    assert calls == [4] * 3 * 3  # the phases ran, 3 steps of 3 chunks of 4 (the last one filled up with stand-ins)
    assert_match(one_graph(monkeypatch, fused, **variant), got, 0)
    assert_match(run(False, **variant)[0], got, BUCKET_NORM_RTOL)


@pytest.mark.parametrize("dtype,kw", [(torch.float64, {}), (torch.float16, {"multi_precision": True}),
                                      (torch.bfloat16, {})], ids=["fp64", "fp16_mp", "bf16"])
def test_two_phases_in_other_dtypes(dtype, kw, monkeypatch):
    """fp64 (the direction held in an fp64 buffer), fp16 master copies (the fp16 weights rounded from the updated
    masters), bf16 computed in fp32: the one-graph step's numbers."""
    got, _ = run(None, dtype, **kw)
    assert_match(one_graph(monkeypatch, None, dtype, **kw), got, 0)


def test_kept_buffers_one_per_place_sized_to_the_largest_tensor_there():
    _, mx = run(None, steps=3)
    bufs = {k: v for k, v in mx._phases.items() if k[0] == "phases"}
    assert list(bufs) == [("phases", torch.float32, torch.float32, torch.device("cpu"))]
    directions, scales = next(iter(bufs.values()))
    chunks = [SHAPES[0:4], SHAPES[4:8], SHAPES[8:9]]  # (the last one's stand-ins have their own)
    assert [d.numel() for d in directions] == [max(torch.Size(c[j]).numel() for c in chunks if j < len(c))
                                               for j in range(4)]
    assert [tuple(x.shape) for x in scales] == [(1,)] * 4
    assert len({x.untyped_storage().data_ptr() for x in directions + scales}) == 8


def test_accelerators_keep_the_one_graph_step():
    opt = LAMB()
    assert _phases.wanted(opt, (LAMB, "norms", torch.float32, "cpu"))
    assert not _phases.wanted(opt, (LAMB, "norms", torch.float32, "cuda"))


def test_the_buffer_is_kept_through_a_schedule_and_is_no_state():
    """A scheduler's new lr at every step rebuilds the group's MXNet-style optimizer: the buffer goes with it
    (not re-made, with its page faults, at each step). It is a cache: deepcopy and pickle leave it out."""
    import copy
    import pickle
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
    opt = ot.LAMB(params, lr=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.9 ** k)
    bufs = []
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
        sched.step()
        mx = opt.mxnet_optimizer(0)
        bufs.append(mx._phases[("phases", torch.float32, torch.float32, torch.device("cpu"))])
    assert bufs[0] is bufs[1] is bufs[2]
    assert "_phases" not in copy.deepcopy(mx).__dict__
    assert "_phases" not in pickle.loads(pickle.dumps(mx)).__dict__


def test_a_lone_large_tensor_runs_alone(monkeypatch):
    """One large tensor (its graph key's only member) is not filled up with stand-ins: each member's loop ends at
    a barrier, which a shared machine makes wait. The one-graph step's numbers."""
    calls, real, replay = [], engine._run, _direct.Replay.run

    def spy(compiled, key, *args, **kw):
        if "phases" in key:
            calls.append(key[-4:])
        return real(compiled, key, *args, **kw)

    def replayed(self, opt, args):
        if "phases" in self.key:
            calls.append(self.key[-4:])
        return replay(self, opt, args)

    def one(two_phase):
        gen = torch.Generator().manual_seed(0)
        param = torch.nn.Parameter(torch.randn(200, generator=gen))
        with monkeypatch.context() as m:
            m.setattr(LAMB, "_two_phase", two_phase)
            opt = ot.LAMB([param], lr=0.01, weight_decay=0.01)
            for _ in range(3):
                param.grad = torch.randn(200, generator=gen)
                opt.step()
        return [param.detach().clone()] + [t.clone() for t in leaves(opt.mx_state(param))], opt.mxnet_optimizer(0)

    monkeypatch.setattr(engine, "_run", spy)
    monkeypatch.setattr(_direct.Replay, "run", replayed)
    got, mx = one(True)
    assert calls == [("phases", 1, True, "first"), ("phases", 1, True, "second")] * 3
    assert not any(k[0] == "phase_padding" for k in mx._phases)
    assert_match(one(False)[0], got, 0)
