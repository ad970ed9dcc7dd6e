"""optzoo.ddp: the 2-bit and Signum-vote DDP comm hooks against the Trainer's dist_sync on the same data (real gloo
processes, 2 and 3 workers), the bytes handed to torch.distributed, and the argument errors in this process."""
import pytest
import torch

import optzoo
import optzoo.ddp
from optzoo.kvstore import compression, signs
import dist_common
import ddp_hooks_worker as W

N_ELEMENTS = sum(p.numel() for p in W.MLP(0).parameters())


@pytest.fixture(scope="module", params=[2, 3], ids=["2 workers", "3 workers"])
def launched(request):
    results = dist_common.run(W.run_all, request.param, timeout=120)
    failed = [r for r in results if not isinstance(r, dict)]
    assert not failed, f"workers failed: {failed} {[getattr(f, 'traceback', '') for f in failed]}"
    return request.param, results


@pytest.mark.parametrize("name", list(W.CONFIGS))
def test_ddp_hook_weights_equal_the_trainers_dist_sync(launched, name):
    world, results = launched
    start = dict(W.MLP(0).named_parameters())
    for rank, r in enumerate(results):
        ddp, ref = r[name]["ddp"]["weights"], r[name]["trainer"]["weights"]
        for n, w in ddp.items():
            assert not torch.equal(w, start[n].detach()), f"{name}: {n} did not move"
            assert torch.equal(w, results[0][name]["ddp"]["weights"][n]), f"{name}: rank {rank} differs from rank 0"
            if W.CONFIGS[name][1] == "twobit" and world % 2:
                # DDP's mean is sum/3 (rounded) and rescale_grad 3/B; the Trainer's sum times 1/B: ~1 ulp a step.
                # With 2 workers both scalings are exact (powers of two) and the weights are equal bit for bit.
                err = (w.double() - ref[n].double()).abs().max() / ref[n].double().abs().max()
                assert err <= 1e-6, f"{name} {n}: relative difference {err:.3g} from the Trainer"
            else:
                assert torch.equal(w, ref[n]), f"{name} {n}: max difference {(w - ref[n]).abs().max():.3g}"


@pytest.mark.parametrize("name", list(W.CONFIGS))
def test_ddp_hook_sends_packed_codes_only(launched, name):
    world, results = launched
    hook = W.CONFIGS[name][1]
    size = compression.packed_size if hook == "twobit" else signs.packed_size
    for r in results:
        out = r[name]["ddp"]
        expected = sum(size(n) for n in out["buckets"])  # 4 ceil(n/16) or ceil(n/8) per bucket
        assert out["bytes"][-1] == expected
        # what was handed to torch.distributed: uint8 payloads of all_gather, summing to bytes_sent
        assert {c[0] for c in out["calls"]} == {"all_gather_single"} and {c[2] for c in out["calls"]} == {"torch.uint8"}
        assert sum(c[1] for c in out["calls"]) == out["bytes"][-1]
        # the hook talks over the state's process group (a group of its own where one was given)
        assert {c[3] for c in out["calls"]} == {"own" if "own_group" in name else "default"}
        fp32_allreduce = 4 * N_ELEMENTS * W.STEPS
        if "small" not in name:  # one bucket a step, as the Trainer's kvstore sends: the same bytes
            assert out["bytes"] == [r[name]["trainer"]["bytes"] * (k + 1) // W.STEPS for k in range(W.STEPS)]
            assert fp32_allreduce / out["bytes"][-1] >= (14.5 if hook == "twobit" else 31)


def test_two_bit_hook_is_lossy_and_keeps_residuals_per_parameter(launched):
    # (the residuals' values are checked through the weights: the Trainer keeps one per parameter too; after
    # step 1 DDP rebuilds its buckets, so residuals kept by bucket slice would land on other parameters)
    _, results = launched
    shapes = {n: p.shape for n, p in W.MLP(0).named_parameters()}
    for r in results:
        for name in ("twobit", "twobit_small_static_view"):
            out = r[name]["ddp"]
            assert min(out["nonzero"]) > 0, "every code was 0: nothing was exchanged"
            assert {n: res.shape for n, res in out["residuals"].items()} == shapes
            for res in out["residuals"].values():
                assert res.dtype == torch.float32 and res.abs().max() > 0  # lossy: something is held back
    assert results[0]["twobit_small_static_view"]["ddp"]["buckets"][-2:] != [N_ELEMENTS], "buckets were not rebuilt"


def test_signum_vote_refuses_a_step_without_a_vote(launched):
    _, results = launched
    for r in results:
        for name in ("signum", "signsgd"):
            out = r[name]["ddp"]
            assert "no vote for parameter(s) [0, 1, 2, 3]" in out["no_sync"] and "no_sync()" in out["no_sync"]
            assert out["unchanged"]


# ---------------------------------------------------------------------- errors, in this process
class _Bucket:
    def __init__(self, buf):
        self._buf = buf

    def buffer(self):
        return self._buf

    def gradients(self):
        return [self._buf]

    def parameters(self):
        return [torch.nn.Parameter(torch.zeros(self._buf.shape))]


@pytest.mark.parametrize("threshold", [0, -0.5, float("nan"), "0.5", True])
def test_two_bit_state_refuses_a_bad_threshold(threshold):
    with pytest.raises(ValueError, match="threshold"):
        optzoo.ddp.TwoBitState(threshold)


def test_two_bit_state_defaults():
    state = optzoo.ddp.TwoBitState(0.25)
    assert (state.threshold, state.process_group, state.bytes_sent, state.residuals) == (0.25, None, 0, {})


@pytest.mark.parametrize("hook", ["twobit", "vote"])
def test_hooks_refuse_integer_gradients(hook):
    p = torch.nn.Parameter(torch.zeros(3))
    state = optzoo.ddp.TwoBitState(0.5) if hook == "twobit" else optzoo.ddp.SignumVoteState(optzoo.torch.Signum([p]))
    fn = optzoo.ddp.twobit_hook if hook == "twobit" else optzoo.ddp.signum_vote_hook
    with pytest.raises(TypeError, match="torch.int32 are not supported"):
        fn(state, _Bucket(torch.zeros(3, dtype=torch.int32)))


@pytest.mark.parametrize("make", [lambda ps: torch.optim.SGD(ps, lr=0.1), lambda ps: optzoo.torch.Adam(ps),
                                  lambda ps: object()], ids=["torch.optim.SGD", "optzoo Adam", "object"])
def test_signum_vote_state_refuses_other_optimizers(make):
    with pytest.raises(TypeError, match="expected an optzoo.torch optimizer with a sign-vote split"):
        optzoo.ddp.SignumVoteState(make([torch.nn.Parameter(torch.zeros(2))]))


def test_signum_vote_state_refuses_multi_precision_half_parameters():
    p = torch.nn.Parameter(torch.zeros(2, dtype=torch.float16))
    with pytest.raises(ValueError, match="multi_precision=True"):
        optzoo.ddp.SignumVoteState(optzoo.torch.Signum([p], multi_precision=True))


def test_signum_vote_state_hooks_come_off():
    p = torch.nn.Parameter(torch.ones(2))
    opt = optzoo.torch.Signum([p], lr=0.5, momentum=0.0)
    state = optzoo.ddp.SignumVoteState(opt)
    state._voters.add(id(p))  # as after a vote: a step without one is refused...
    p.grad = torch.ones(2)
    with pytest.raises(RuntimeError, match="no vote"):
        opt.step()
    state.remove()  # ...until the hooks are removed: a plain local Signum step
    opt.step()
    assert p.detach().tolist() == [0.5, 0.5]


# ---------------------------------------------------------------------- the example, as one process
@pytest.mark.parametrize("hook, sent", [("twobit", 172), ("signum", 85), ("none", 2704)])
def test_example_runs_in_one_process(monkeypatch, capsys, hook, sent):
    import socket
    from optzoo.examples import ddp_hooks
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in dict(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)).items():
        monkeypatch.setenv(key, value)
    ddp_hooks.main(["--hook", hook, "--epochs", "1"])
    out = capsys.readouterr().out
    assert "epoch 1 loss" in out  # 676 parameters, one bucket: 4 ceil(676/16), ceil(676/8), 4 * 676 bytes a step
    assert f"bytes per step per worker: {sent} ({hook}; fp32 all-reduce: 2704)" in out
