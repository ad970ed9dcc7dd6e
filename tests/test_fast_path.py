"""The fast path (large tensors in place, small ones packed; eager or compiled) gives the reference path's
numbers, and never takes the user's tensors.

Spec-driven: every optimizer and option variant, through both faces. Eager packs equal the reference path
bit for bit, and so do compiled elementwise kernels (no FP contraction, the same operation order, correctly
rounded roots); compiled per-tensor sums are fp64 sums (spec flags bucket_norms, compiled_row_sums), held
to a stated bound.
"""
import pytest
import torch

import optzoo
import optzoo.torch as ot
from optzoo.optimizer import engine
from optzoo.optimizer._tree import leaves
from specs import SPECS

#: compiled LARS/LAMB per-tensor norms are fp64 row sums, not MXNet's sequential fp32 sums (flag bucket_norms);
#: compiled GroupAdaGrad row sums are fp64 sums, not Kahan's (flag compiled_row_sums)
BUCKET_NORM_RTOL = 1e-5
COMPILED_RTOL = BUCKET_NORM_RTOL


def compiled_rtol(spec, dtype=torch.float32):
    """0 (bit for bit) for elementwise rules; for compiled sums, the stated bound, or in fp16/bf16 one unit of the
    weight's last place (a sum's last bit moves the fp32 scale by an ulp, which may move the rounded weight)."""
    if not {"bucket_norms", "compiled_row_sums"} & spec.flags:
        return 0
    return max(BUCKET_NORM_RTOL, torch.finfo(dtype).eps)


#: The weight dtypes the compiled kernels are compared in: fp16 and bf16 weights without a master copy compute
#: in their own dtype (SGD, NAG, LBSGD: MXNet's half_t kernels) or in fp32 with their scalars held in fp32;
#: either way the compiled kernel must round every scalar and every intermediate as the reference path does
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
          pytest.param(torch.bfloat16, id="bf16")]


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
        opt.mxnet_optimizer(0)._noise = lambda w, lr: torch.zeros_like(w)  # compare the drift; noise is tested apart
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(dtype)
        opt.step()
    return [p.detach().clone() for p in params] + [t.clone() for p in params for t in leaves(opt.mx_state(p))]


def assert_match(ref, got, rtol):
    for a, b in zip(ref, got):
        if rtol == 0:
            assert torch.equal(a, b) or (torch.isnan(a) == torch.isnan(b)).all() and torch.equal(a.nan_to_num(),
                                                                                                  b.nan_to_num())
        else:
            scale = float(a.abs().nan_to_num(0.0, 0.0, 0.0).max())
            torch.testing.assert_close(b, a, rtol=rtol, atol=rtol * scale, equal_nan=True)


@pytest.mark.parametrize("spec,variant", variant_params())
def test_eager_packs_equal_the_reference_path(spec, variant):
    assert_match(run_face(spec, variant, False), run_face(spec, variant, None), 0)


@pytest.mark.parametrize("spec", [pytest.param(s, id=s.name) for s in SPECS])
def test_eager_packs_multi_precision(spec):
    kw = dict(dtype=torch.float16, multi_precision=True)
    assert_match(run_face(spec, spec.variants[-1], False, **kw), run_face(spec, spec.variants[-1], None, **kw), 0)


@pytest.mark.parametrize("spec", [pytest.param(s, id=s.name) for s in SPECS])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.filterwarnings("ignore:Accumulating with")
def test_compiled_tensors_in_place_match_the_reference_path(spec, dtype):
    """fused=True: every tensor updated by itself, in place, by the compiled kernel."""
    variant = spec.variants[-1]
    assert_match(run_face(spec, variant, False, dtype=dtype), run_face(spec, variant, True, dtype=dtype),
                 compiled_rtol(spec, dtype))


@pytest.mark.parametrize("spec", [pytest.param(s, id=s.name) for s in SPECS])
@pytest.mark.filterwarnings("error::RuntimeWarning")  # "compiling the fused optimizer kernel failed"
def test_compiled_kernels_clip_without_falling_back(spec):
    """clip_gradient in a compiled kernel: its bound is a constant made before the kernel runs (parsed while
    dynamo traced, it failed to compile, and every clipping kernel ran eagerly)."""
    variant = {**spec.variants[-1], "clip_gradient": 0.3}
    assert_match(run_face(spec, variant, False), run_face(spec, variant, True), compiled_rtol(spec))


@pytest.mark.parametrize("spec", [pytest.param(s, id=s.name) for s in SPECS])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.filterwarnings("ignore:Accumulating with")
def test_default_path_compiles_large_tensors_and_large_packs(spec, dtype, monkeypatch):
    """fused=None with a low threshold: the [3, 4] tensors count as large (compiled, in place), and the
    pack of the small ones as large (compiled over the pack): the reference path's numbers."""
    monkeypatch.setattr(engine, "LARGE", 12)
    variant = spec.variants[0]
    assert_match(run_face(spec, variant, False, dtype=dtype), run_face(spec, variant, None, dtype=dtype),
                 compiled_rtol(spec, dtype))


@pytest.mark.parametrize("spec", [pytest.param(s, id=s.name) for s in SPECS])
def test_trainer_fast_path_with_per_parameter_multipliers(spec):
    """Different lr/wd multipliers inside one pack become per-element scalars; same numbers."""
    def multipliers(trainer):
        trainer.set_lr_mult({"p1": 0.5})
        if "no_wd" not in spec.flags:
            trainer.set_wd_mult({"p2": 0.0})

    kw = hyper(spec, spec.variants[-1])
    assert_match(train(spec, kw, False, 4, multipliers), train(spec, kw, None, 4, multipliers), 0)


def train(spec, kw, fused, steps, setup=None):
    """Weights after ``steps`` Trainer steps on seeded gradients (SGLD's noise off), ``setup(trainer)`` first."""
    gen = torch.Generator().manual_seed(0)
    params = {f"p{k}": torch.nn.Parameter(torch.randn(s, generator=gen)) for k, s in enumerate(shapes(spec))}
    trainer = optzoo.Trainer(params, spec.name, kw, fused=fused)
    if setup is not None:
        setup(trainer)
    if "stochastic" in spec.flags:
        trainer.optimizer._noise = lambda w, lr: torch.zeros_like(w)
    for _ in range(steps):
        for p in params.values():
            p.grad = torch.randn(p.shape, generator=gen)
        trainer.step(2)
    return [p.detach().clone() for p in params.values()]


@pytest.mark.parametrize("fused", [None, True])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_parameters_and_grads_stay_the_users_tensors(fused, memory_format):
    """No re-binding, re-striding or aliasing: after steps, each parameter keeps its storage and strides,
    ``.grad`` is the tensor the user (autograd) made, and the update is the reference path's."""
    def run(mode):
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(8, 3, 4, 4, generator=gen).to(memory_format=memory_format)),
                  torch.nn.Parameter(torch.randn(70000, generator=gen)), torch.nn.Parameter(torch.randn(5, generator=gen))]
        opt = ot.Adam(params, lr=0.1, fused=mode)
        before = [(p.data_ptr(), p.stride()) for p in params]
        for _ in range(2):
            grads = [torch.randn(p.shape, generator=gen).to(memory_format=memory_format if p.dim() == 4 else
                                                             torch.contiguous_format) for p in params]
            for p, g in zip(params, grads):
                p.grad = g
            opt.step()
            assert all(p.grad is g for p, g in zip(params, grads))
        assert [(p.data_ptr(), p.stride()) for p in params] == before
        # each parameter still owns its storage (safetensors, torch.save of one tensor: no shared buffer)
        assert all(p.untyped_storage().nbytes() == p.numel() * p.element_size() for p in params)
        return [p.detach().clone() for p in params]

    assert_match(run(False), run(fused), 0)


def test_frozen_parameters_get_no_state():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    model[0].requires_grad_(False)
    for fused in (None, False, True):
        opt = ot.Adam(model.parameters(), fused=fused)
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
        assert set(opt.state) == {model[1].weight, model[1].bias}


@pytest.mark.parametrize("spec", [pytest.param(s, id=s.name) for s in SPECS])
@pytest.mark.filterwarnings("ignore:Accumulating with")
def test_eager_packs_half_precision_without_master_copy(spec):
    ref = run_face(spec, spec.variants[-1], False, dtype=torch.bfloat16)
    assert_match(ref, run_face(spec, spec.variants[-1], None, dtype=torch.bfloat16), 0)


def test_a_failing_compiler_falls_back_with_one_warning(monkeypatch):
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


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_compiled_sqrt_rn_is_numpys_correctly_rounded_root(dtype):
    """Inside compiled kernels sqrt_rn is inductor's own root (the processor's IEEE instruction): the same
    bits as numpy's, every binade, subnormals and the tails of the vector loop included."""
    import numpy as np
    from optzoo.optimizer._numerics import sqrt_rn
    bits = torch.randint(1, 0x7F7FFFFF, (4099,), generator=torch.Generator().manual_seed(5), dtype=torch.int32)
    x = bits.view(torch.float32).to(dtype)
    x = x[torch.isfinite(x) & (x > 0)]
    got = torch.compile(sqrt_rn, dynamic=False)(x)
    want = torch.from_numpy(np.sqrt(x.float().numpy())).to(dtype)  # fp32 root rounded once more: exact
    assert torch.equal(got, want)


@pytest.mark.parametrize("spec,variant", variant_params())
def test_fast_path_under_a_changing_schedule(spec, variant):
    """A scheduler changes lr between steps: per-index side effects of reading it (LARS's momentum
    correction) and Nadam's shared schedule are the same when a pack's indices are read together."""
    from optzoo.lr_scheduler import FactorScheduler

    def kw():  # a scheduler object per run: it is stateful
        return dict(hyper(spec, variant), lr_scheduler=FactorScheduler(step=1, factor=0.7, base_lr=0.05))

    assert_match(train(spec, kw(), False, 5), train(spec, kw(), None, 5), 0)


def test_row_state_packs_stack_the_rows_of_equal_width_parameters():
    """GroupAdaGrad keeps one value per row: a pack holds 2-D parameters, the per-row history flat, and runs
    of equal column count stacked."""
    segs = engine.Segments([12, 12, 12, 20], "cpu", [3, 6, 3, 5])
    assert [run[3:5] for run in segs.runs] == [(3, 4), (6, 2), (8, 4)]
    assert segs.total_rows == 17
    params = [torch.nn.Parameter(torch.randn(s)) for s in [(3, 4), (6, 2), (3, 4), (5, 4)]]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for p, q in zip(params, ref):
        p.grad = torch.randn(p.shape)
        q.grad = p.grad.clone()
    ot.create("groupadagrad", params).step()
    ot.create("groupadagrad", ref, fused=False).step()
    assert all(torch.equal(p, q) for p, q in zip(params, ref))


@pytest.mark.parametrize("fused", [None, True])
def test_row_state_fast_path_rejects_weight_decay_before_any_change(fused):
    params = {f"p{k}_weight": torch.nn.Parameter(torch.randn(3, 4)) for k in range(3)}
    trainer = optzoo.Trainer(params, "groupadagrad", {"learning_rate": 0.1}, fused=fused)
    for p in params.values():
        p.grad = torch.randn(p.shape)
    trainer.step(1)
    before = [p.detach().clone() for p in params.values()]
    counts = dict(trainer.optimizer._index_update_count)
    trainer.optimizer.wd = 0.1
    for p in params.values():
        p.grad = torch.randn(p.shape)
    with pytest.raises(ValueError, match="weight decay"):
        trainer.step(1)
    assert all(torch.equal(a, p.detach()) for a, p in zip(before, params.values()))
    assert trainer.optimizer._index_update_count == counts


def test_kahan_sum_in_numpy_equals_the_torch_loop():
    """The numpy loop of kahan_sum (no test for an infinite partial sum, rows that end non-finite summed
    again with it) gives the bits of the plain loop, overflow and nan included."""
    from optzoo.optimizer._numerics import _kahan_sum_torch, kahan_sum
    gen = torch.Generator().manual_seed(3)
    for dtype in (torch.float16, torch.float32, torch.float64):
        for shape in [(7, 33), (1, 1000), (50, 3), (3, 1), (2, 5, 9)]:
            x = ((torch.randn(shape, generator=gen) * 10) ** 2).to(dtype)
            assert torch.equal(kahan_sum(x), _kahan_sum_torch(x))
    x = torch.tensor([[1e38, 3e38, 1.0, -3e38], [1.0, float("nan"), 2.0, 3.0], [1.0, 2.0, 3.0, 4.0],
                      [float("inf"), 1.0, 2.0, 3.0]])
    got, want = kahan_sum(x), _kahan_sum_torch(x)
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num())
    assert torch.equal(kahan_sum(torch.zeros(2, 0)), torch.zeros(2, 1))  # empty rows sum to 0


@pytest.mark.parametrize("fused", [None, True])
@pytest.mark.parametrize("generator", [False, True], ids=["default_rng", "generator"])
def test_stochastic_fast_path_draws_the_reference_noise(fused, generator):
    """SGLD's fast path draws its noise per parameter in index order before the kernel: with the same
    seed (or generator) it gives the reference path's numbers, noise included (compiled: the drift
    within the compiled bound, the same draws)."""
    spec = next(s for s in SPECS if "stochastic" in s.flags)

    def run(mode, seed=11):
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(12)
        params = {f"p{k}": torch.nn.Parameter(torch.randn(s, generator=gen)) for k, s in enumerate(shapes(spec))}
        noise = torch.Generator().manual_seed(seed + 2) if generator else None
        kw = dict(learning_rate=0.1, wd=0.01, generator=noise)
        trainer = optzoo.Trainer(params, spec.name, kw, fused=mode)
        trainer.set_lr_mult({"p1": 0.5})
        for _ in range(3):
            for p in params.values():
                p.grad = torch.randn(p.shape, generator=gen)
            trainer.step(1)
        return [p.detach().clone() for p in params.values()]

    ref = run(False)
    assert not torch.equal(ref[0], run(False, seed=21)[0])  # the noise matters
    assert_match(ref, run(fused), 0)


@pytest.mark.parametrize("fused", [None, True])
def test_stochastic_noise_counts_places_in_memory_in_a_pack(fused):
    """SGLD's noise for an element is that of its place in memory: a small channels_last (or transposed) weight
    among packed ones gets the reference path's noise (a pack's copy of it is in the logical order)."""
    def run(mode):
        torch.manual_seed(5)
        gen = torch.Generator().manual_seed(6)
        ps = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(4, 3, 3, 3), (8,), (8, 4), (8,), (5,)]]
        ps[0].data = ps[0].detach().contiguous(memory_format=torch.channels_last)
        ps[2].data = ps[2].detach().t().contiguous().t()
        opt = ot.SGLD(ps, lr=0.1, fused=mode)
        for _ in range(3):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        return [p.detach().clone() for p in ps]
    ref = run(False)
    for got, want in zip(run(fused), ref):
        assert torch.equal(got, want)


@pytest.mark.parametrize("fused", [None, True])
def test_accumulating_fast_path_follows_the_reference_through_missing_gradients(fused):
    """LBSGD with batch_scale > 1: a parameter without a gradient in a step falls behind in its count; the
    bucket then runs on the reference path until the counts agree again, and the fast path takes over the
    accumulators the reference path left (same numbers, accumulator dump included)."""
    pattern = [(1, 1, 1), (1, 0, 1), (0, 1, 0), (1, 1, 1), (1, 1, 1), (1, 1, 1)]

    def run(mode):
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(3, 4), (5,), (2, 2)]]
        opt = ot.create("lbsgd", params, fused=mode, momentum=0.9, batch_scale=3, warmup_epochs=1,
                        updates_per_epoch=4)
        for has in pattern:
            for p, h in zip(params, has):
                p.grad = torch.randn(p.shape, generator=gen) if h else None
            opt.step()
        cum = [opt.param_groups[0]["optzoo"]["cumgrads"][i]["cum_grad"] for i in range(3)]
        return [p.detach().clone() for p in params] + [c if isinstance(c, torch.Tensor) else torch.tensor(c)
                                                       for c in cum]

    assert_match(run(False), run(fused), 0)


def run_uneven(spec, fused, dtype, steps=4):
    """Five parameters in one pack, the second without a gradient on every other step: per-index scalars that
    differ within the pack (update counts, schedules), spread per element or held as columns."""
    gen = torch.Generator().manual_seed(3)
    shapes = [spec.shapes[0]] * 3 + [spec.shapes[-1]] * 2
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]
    opt = ot.create(spec.name, params, fused=fused, **hyper(spec, spec.variants[0]))
    for step in range(steps):
        for k, p in enumerate(params):
            p.grad = None if k == 1 and step % 2 else torch.randn(p.shape, generator=gen).to(dtype)
        opt.step()
    return [p.detach().clone() for p in params] + [t.clone() for p in params for t in leaves(opt.mx_state(p))]


@pytest.mark.parametrize("spec", [pytest.param(s, id=s.name) for s in SPECS if "stochastic" not in s.flags])
@pytest.mark.parametrize("dtype", DTYPES[1:])
@pytest.mark.parametrize("fused", [None, True], ids=["default", "compiled"])
@pytest.mark.filterwarnings("ignore:Accumulating with")
def test_half_precision_packs_keep_per_parameter_scalars_wide(spec, dtype, fused):
    """fp16/bf16 weights in a pack whose per-parameter scalars differ: a scalar held in fp32 (Adam's
    bias-corrected lr, Nadam's schedule, Signum's 1 - mu) keeps its fp32 value when spread over the pack, as the
    reference path's Python float does (in the weight dtype it rounded: Nadam's weights moved by an ulp)."""
    assert_match(run_uneven(spec, False, dtype), run_uneven(spec, fused, dtype), compiled_rtol(spec, dtype))


def run_mxnet_face(spec, fused, dtype, listed, steps=3):
    """The MXNet-style face on fp16/bf16 weights without a master copy: large and small tensors, one index with
    an lr multiplier (its scalars differ from the others'), clipping and rescaling."""
    gen = torch.Generator().manual_seed(5)
    shapes = [(300, 300), (7, 11), (70, 1000), (5, 9), (64, 1030), (3, 3)]
    ws = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    variant = dict(spec.variants[0])  # (with momentum where the rule takes it: its state and kernel)
    if any("momentum" in v for v in spec.variants):
        variant.setdefault("momentum", 0.9)
    opt = optzoo.optimizer.create(spec.name, rescale_grad=0.8, clip_gradient=0.7, **hyper(spec, variant))
    opt.set_lr_mult({1: 0.5})
    opt._fused = fused
    with torch.no_grad():
        states = [opt.create_state_multi_precision(i, w) for i, w in enumerate(ws)]
        for _ in range(steps):
            gs = [torch.randn(w.shape, generator=gen).to(dtype) for w in ws]
            if listed:
                opt.update_multi_precision(list(range(len(ws))), ws, gs, states)
            else:
                for i in range(len(ws)):
                    opt.update_multi_precision(i, ws[i], gs[i], states[i])
    return ws + [t for st in states for t in leaves(st)]


@pytest.mark.parametrize("spec", [pytest.param(s, id=s.name) for s in SPECS if "stochastic" not in s.flags])
@pytest.mark.parametrize("dtype", DTYPES[1:])
@pytest.mark.parametrize("listed", [True, False], ids=["list", "one_by_one"])
@pytest.mark.filterwarnings("ignore:Accumulating with")
def test_mxnet_face_half_precision_default_path_is_the_reference_path(spec, dtype, listed):
    """``update`` on fp16/bf16 weights (large ones compiled in place, small ones packed) gives the reference
    path's numbers: fp16 LBSGD's ``lr * wd`` had differed by an ulp."""
    assert_match(run_mxnet_face(spec, False, dtype, listed), run_mxnet_face(spec, None, dtype, listed),
                 compiled_rtol(spec, dtype))
