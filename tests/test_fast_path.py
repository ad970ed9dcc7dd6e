"""The fast path (contiguous buckets, eager or compiled) gives the reference path's numbers.

Spec-driven: every optimizer and option variant, through both faces. ``fused=None`` must equal the
reference path bit for bit; ``fused=True`` (torch.compile) is held to a stated bound: the compiled
loop may contract or reorder float operations, and sums norms differently (spec flag bucket_norms).
"""
import pytest
import torch

import optzoo
import optzoo.torch as ot
from optzoo.optimizer._tree import leaves
from specs import SPECS

#: fused=True: inductor may use FMA and reassociate; measured max relative difference is ~1e-7
COMPILED_RTOL = 1e-5
#: compiled LARS/LAMB per-tensor norms over a bucket are fp64 segment sums, not MXNet's sequential fp32 sums
BUCKET_NORM_RTOL = 1e-5


def variant_params():
    return [pytest.param(s, v, id=f"{s.name}-v{i}") for s in SPECS for i, v in enumerate(s.variants)]


def hyper(spec, variant):
    kw = dict(variant)
    if "no_wd" not in spec.flags:
        kw["wd"] = 0.01
    return kw


def shapes(spec):
    return list(spec.shapes) + [spec.shapes[0]]


def run_face(spec, variant, fused, dtype=torch.float32, steps=4, **extra):
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes(spec)]
    opt = ot.create(spec.name, params, fused=fused, **hyper(spec, variant), **extra)
    if "stochastic" in spec.flags:
        for inner in opt._inner:
            inner._noise = lambda w, lr: torch.zeros_like(w)   # compare the drift; the noise is tested apart
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(dtype)
        opt.step()
    return [p.detach().clone() for p in params] + [t.clone() for p in params for t in leaves(opt.state[p]["mx_state"])]


def assert_match(ref, got, rtol):
    for a, b in zip(ref, got):
        if rtol == 0:
            assert torch.equal(a, b) or (torch.isnan(a) == torch.isnan(b)).all() and torch.equal(a.nan_to_num(),
                                                                                                  b.nan_to_num())
        else:
            scale = float(a.abs().nan_to_num(0.0, 0.0, 0.0).max())
            torch.testing.assert_close(b, a, rtol=rtol, atol=rtol * scale, equal_nan=True)


@pytest.mark.parametrize("spec,variant", variant_params())
def test_eager_buckets_equal_the_reference_path(spec, variant):
    assert_match(run_face(spec, variant, False), run_face(spec, variant, None), 0)


@pytest.mark.parametrize("spec", [pytest.param(s, id=s.name) for s in SPECS])
def test_eager_buckets_multi_precision(spec):
    kw = dict(dtype=torch.float16, multi_precision=True)
    assert_match(run_face(spec, spec.variants[-1], False, **kw), run_face(spec, spec.variants[-1], None, **kw), 0)


@pytest.mark.parametrize("spec", [pytest.param(s, id=s.name) for s in SPECS])
def test_compiled_kernels_match_the_reference_path(spec):
    rtol = max(COMPILED_RTOL, BUCKET_NORM_RTOL) if "bucket_norms" in spec.flags else COMPILED_RTOL
    assert_match(run_face(spec, spec.variants[-1], False), run_face(spec, spec.variants[-1], True), rtol)


@pytest.mark.parametrize("spec", [pytest.param(s, id=s.name) for s in SPECS])
@pytest.mark.parametrize("chunk", [None, 5], ids=["whole", "chunked"])
def test_trainer_fast_path_with_per_parameter_multipliers(spec, chunk, monkeypatch):
    """Different lr/wd multipliers inside one bucket become per-element scalars; same numbers."""
    from optzoo.optimizer import engine
    if chunk:
        monkeypatch.setattr(engine, "EAGER_CHUNK", chunk)
    def run(fused):
        gen = torch.Generator().manual_seed(0)
        params = {f"p{k}": torch.nn.Parameter(torch.randn(s, generator=gen)) for k, s in enumerate(shapes(spec))}
        trainer = optzoo.Trainer(params, spec.name, hyper(spec, spec.variants[-1]), fused=fused)
        trainer.set_lr_mult({"p1": 0.5})
        if "no_wd" not in spec.flags:
            trainer.set_wd_mult({"p2": 0.0})
        if "stochastic" in spec.flags:
            trainer.optimizer._noise = lambda w, lr: torch.zeros_like(w)
        for _ in range(4):
            for p in params.values():
                p.grad = torch.randn(p.shape, generator=gen)
            trainer.step(2)
        return [p.detach().clone() for p in params.values()]

    assert_match(run(False), run(None), 0)


def test_buckets_make_parameters_and_grads_views():
    model = torch.nn.Linear(4, 3)
    opt = ot.Adam(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    (bucket,) = opt._runners[0].buckets
    assert model.weight.data_ptr() == bucket.w.data_ptr()
    assert model.bias.grad.data_ptr() == bucket.g[12:].data_ptr()
    # zero_grad(set_to_none=True) then backward allocates new grads: the next step copies them in
    opt.zero_grad()
    model(torch.randn(2, 4)).sum().backward()
    before = model.weight.detach().clone()
    opt.step()
    assert not torch.equal(before, model.weight.detach())
    assert model.weight.grad.data_ptr() == bucket.g.data_ptr()


@pytest.mark.parametrize("spec", [pytest.param(s, id=s.name) for s in SPECS])
@pytest.mark.filterwarnings("ignore:Accumulating with")
def test_eager_buckets_half_precision_without_master_copy(spec):
    ref = run_face(spec, spec.variants[-1], False, dtype=torch.bfloat16)
    assert_match(ref, run_face(spec, spec.variants[-1], None, dtype=torch.bfloat16), 0)


def test_a_failing_compiler_falls_back_with_one_warning(monkeypatch):
    from optzoo.optimizer import engine

    def broken_compile(fn, **kwargs):
        def compiled(*args):
            raise RuntimeError("no C compiler found")
        return compiled

    monkeypatch.setattr(engine, "_COMPILED", {})
    monkeypatch.setattr(engine.torch, "compile", broken_compile)
    spec = next(s for s in SPECS if s.name == "adam")
    with pytest.warns(RuntimeWarning, match="no C compiler found") as record:
        got = run_face(spec, spec.variants[0], True)
    assert len([w for w in record if issubclass(w.category, RuntimeWarning)]) == 1
    assert_match(run_face(spec, spec.variants[0], False), got, 0)


@pytest.mark.parametrize("spec,variant", variant_params())
def test_mxnet_style_list_update_of_many_small_tensors(spec, variant):
    """update() with a list of many small tensors runs as one flat pass: same numbers as one by one."""
    def run(listed):
        torch.manual_seed(0)
        opt = optzoo.optimizer.create(spec.name, **hyper(spec, variant))
        if "stochastic" in spec.flags:
            opt._noise = lambda w, lr: torch.zeros_like(w)
        gen = torch.Generator().manual_seed(1)
        ws = [torch.randn(spec.shapes[k % 2], generator=gen) for k in range(10)]
        states = [opt.create_state_multi_precision(i, w) for i, w in enumerate(ws)]
        for _ in range(3):
            gs = [torch.randn(w.shape, generator=gen) for w in ws]
            if listed:
                opt.update_multi_precision(list(range(10)), ws, gs, states)
            else:
                for i in range(10):
                    opt.update_multi_precision(i, ws[i], gs[i], states[i])
        return ws + [t for st in states for t in leaves(st)]

    assert_match(run(False), run(True), 0)


@pytest.mark.parametrize("spec,variant", variant_params())
def test_eager_buckets_in_chunks_equal_the_reference_path(spec, variant, monkeypatch):
    """Large buckets run elementwise kernels chunk by chunk: chunks that cut through parameters (and
    per-element scalars) give the same numbers."""
    from optzoo.optimizer import engine
    monkeypatch.setattr(engine, "EAGER_CHUNK", 7)
    assert_match(run_face(spec, variant, False), run_face(spec, variant, None), 0)
    kw = dict(dtype=torch.float16, multi_precision=True)
    assert_match(run_face(spec, variant, False, **kw), run_face(spec, variant, None, **kw), 0)
