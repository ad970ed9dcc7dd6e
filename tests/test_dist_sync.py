"""dist_sync: N workers equal one process, the Signum sign vote, 2-bit compression (real gloo processes),
and the packing/quantisation rules and argument errors in this process."""
import math

import pytest
import torch

import optzoo
from optzoo.kvstore import compression, signs
import dist_common
import dist_sync_worker as W

WORLD = 3


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("dist") / "trainer.states")
    results = dist_common.run(W.numerics, WORLD, args=(path,), timeout=90)
    failed = [r for r in results if not isinstance(r, dict)]
    assert not failed, f"workers failed: {failed} {[getattr(f, 'traceback', '') for f in failed]}"
    return results


# ---------------------------------------------------------------------- N workers == one process
@pytest.mark.parametrize("cfg", W.CONFIGS, ids=[c[0] for c in W.CONFIGS])
def test_workers_on_slices_equal_one_process_on_the_batch(launched, cfg):
    ref = W.train(0, 1, cfg)  # one process, the whole batch, no kvstore
    init = W.init_weights()
    for name in W.NAMES:
        assert not torch.equal(ref[name], init[name]) or name == "fc2.bias", f"{cfg[0]}: {name} did not move"
        ours = [r["train"][cfg[0]][name] for r in launched]
        for rank, w in enumerate(ours):
            assert torch.equal(w, ours[0]), f"{cfg[0]}: rank {rank} holds other weights than rank 0"
        err = (ours[0].double() - ref[name].double()).abs().max() / ref[name].double().abs().max()
        assert err <= 1e-6, f"{cfg[0]} {name}: relative difference {err:.3g} from one process"


def test_workers_with_other_parameters_are_refused_by_name(launched):
    for r in launched:
        ranks, message = r["mismatch"]
        assert ranks == (WORLD - 1,) and f"rank(s) [{WORLD - 1}] have other parameter names, shapes" in message


def test_a_gradient_fresh_on_one_worker_is_summed_with_zeros_everywhere(launched):
    # SGD lr 1, momentum 0.5, batch 1: mom = 0.5 mom - g_sum, w += mom; a's grads sum to 6 + 3 step, b's is
    # rank 0's 10 (step + 1); step 1 goes through allreduce_grads() + update()
    mom_a = mom_b = 0.0
    wa = wb = 0.0
    for step in range(3):
        mom_a = 0.5 * mom_a - (6 + 3 * step)
        mom_b = 0.5 * mom_b - 10 * (step + 1)
        wa, wb = wa + mom_a, wb + mom_b
        for r in launched:
            assert r["partial"]["a"][step].tolist() == [wa] * 3
            assert r["partial"]["b"][step].tolist() == [wb] * 2


def test_checkpoints_rank_0_writes_every_rank_resumes(launched):
    # after load_states every rank holds rank 0's momentum: the resumed step is the same everywhere and
    # continues the run (grads 1 on 3 workers: g_sum 3)
    a_mom = 0.5 * (0.5 * (0.5 * 0 - 6) - 9) - 12
    b_mom = 0.5 * (0.5 * (0.5 * 0 - 10) - 20) - 30
    for r in launched:
        assert r["partial"]["saved_visible"]
        a, b = r["partial"]["resumed"]
        assert a.tolist() == [r["partial"]["a"][-1][0].item() + 0.5 * a_mom - 3] * 3
        assert b.tolist() == [r["partial"]["b"][-1][0].item() + 0.5 * b_mom - 3] * 2


# ---------------------------------------------------------------------- Signum: majority vote of signs
@pytest.mark.parametrize("kind, mu", [("signum", 0.9), ("signsgd", 0.0)])
def test_signum_steps_by_the_majority_vote_of_the_workers_signs(launched, kind, mu):
    lr, wd, wd_lh, rg = 0.1, 0.01, 0.02, 1 / 4
    outs = [r[kind] for r in launched]
    disagree = 0
    for step in range(3):
        before = outs[0]["before"][step]
        after = outs[0]["before"][step + 1] if step < 2 else outs[0]["after"]
        for o in outs:
            for n in ("w", "v"):
                assert torch.equal(o["before"][step][n], before[n]), "workers hold different weights"
        for n in ("w", "v"):
            w = before[n].double()
            local = []
            for o in outs:
                g = o["grads"][step][n].double()
                if mu:
                    prev = o["moms"][step - 1][n].double() if step else torch.zeros_like(w)
                    mom = mu * prev - (1 - mu) * wd * w - (1 - mu) * rg * g
                    torch.testing.assert_close(o["moms"][step][n].double(), mom, rtol=1e-6, atol=1e-7)
                    x = o["moms"][step][n].double()  # the worker's own fp32 momentum decides its sign
                else:
                    assert o["moms"][step][n] is None
                    x = g
                local.append(torch.where(x >= 0, 1.0, -1.0).double())  # zero is sent as +1
            vote = torch.sign(sum(local))
            disagree += int((torch.stack(local) != vote).any(0).sum())
            if mu:
                expected = (1 - lr * wd_lh) * w + lr * vote
            else:
                expected = (1 - lr * wd - lr * wd_lh) * w - lr * vote
            torch.testing.assert_close(after[n].double(), expected, rtol=1e-6, atol=1e-7)
            for o in outs:
                assert torch.equal((o["before"][step + 1] if step < 2 else o["after"])[n], after[n])
        if not mu:  # g = 0 on every worker counts as +1: the weight steps by -lr (one process: not at all)
            assert after["w"][0].item() == pytest.approx((1 - lr * wd - lr * wd_lh) * before["w"][0].item() - lr)
    assert disagree > 0, "the workers' signs always agreed: the vote is not exercised"
    n = 37 + 6
    for o in outs:
        assert o["bytes"] == [math.ceil(n / 8) * (k + 1) for k in range(3)]  # 1 bit per element per step


# ---------------------------------------------------------------------- 2-bit compression
def test_two_bit_compression_sums_the_quantised_gradients_with_residuals(launched):
    th = 0.5
    outs = [r["twobit"] for r in launched]
    residual = [{"w": torch.zeros(21, dtype=torch.float64), "v": torch.zeros(2, 5, dtype=torch.float64)}
                for _ in outs]
    lossy = False
    total = {"w": torch.zeros(21, dtype=torch.float64), "v": torch.zeros(2, 5, dtype=torch.float64)}
    for step in range(3):
        for n in ("w", "v"):
            summed = torch.zeros_like(total[n])
            for r, o in enumerate(outs):
                res = residual[r][n] + o["grads"][step][n].double()
                q = torch.where(res >= th, th, torch.where(res <= -th, -th, 0.0))
                residual[r][n] = res - q
                summed += q
            raw = sum(o["grads"][step][n].double() for o in outs)
            lossy |= not torch.equal(summed, raw)
            for o in outs:
                assert torch.equal(o["sums"][step][n].double(), summed), f"step {step} {n}: summed codes differ"
            total[n] += summed
    assert lossy
    for o in outs:
        for n in ("w", "v"):
            torch.testing.assert_close(o["after"][n].double(), -total[n], rtol=0, atol=1e-6)
        assert o["bytes"] == [4 * math.ceil(31 / 16) * (k + 1) for k in range(3)]  # 16 codes per 32-bit word


@pytest.mark.parametrize("n", [0, 1, 3, 4, 15, 16, 17, 33, 100])
def test_two_bit_packing_round_trips_in_whole_words(n):
    q = torch.randint(-1, 2, (n,), generator=torch.Generator().manual_seed(n), dtype=torch.int8)
    packed = compression.pack_2bit(q)
    assert packed.dtype == torch.uint8 and packed.numel() == 4 * math.ceil(n / 16)
    assert torch.equal(compression.unpack_2bit(packed, n), q)


def test_two_bit_codes_lie_where_mxnet_puts_them():
    # MXNet's quantize_2bit: element j of a byte at bits 7-2j (posbits 0xc0 0x30 0x0c 0x03, negbits 0x80 ...)
    q = torch.tensor([1, -1, 0, 1, 0, 0, -1, -1], dtype=torch.int8)
    assert compression.pack_2bit(q).tolist() == [0b11100011, 0b00001010, 0, 0]


#: MXNet 1.9.1 (kv.create('device'), set_gradient_compression({'type': '2bit', 'threshold': 0.3}), two CPU
#: pushers with gradients g_k[j] = ((7j + 3 step + 5k) % 17 - 8) / 20, fp32): the pulled sums over 4 steps,
#: in units of fp32(0.3)
MXNET_2BIT_SUMS = [
    [-1, 0, 0, 0, 1, -1, 0, 1, 0, -1, -1, 1, 1, 0, -1, 0, 1, -1, 0],
    [-1, 1, -1, 0, 1, 0, 1, -2, 1, 0, 0, -1, 0, 1, 1, -1, 0, -1, 1],
    [0, 1, -1, 1, -1, 0, 1, 0, 1, 0, 1, 0, -1, 0, 0, 1, 1, 0, 1],
    [1, 0, 0, 0, -1, 1, 0, 0, 1, -1, 1, 0, 0, 0, 0, 0, 0, 1, 0],
]


def test_two_bit_rule_matches_mxnet_recorded_sums():
    th, n = 0.3, 19
    residuals = [torch.zeros(n), torch.zeros(n)]
    th32 = torch.tensor(th, dtype=torch.float32)
    for step, expected in enumerate(MXNET_2BIT_SUMS):
        total = torch.zeros(n)
        for k in range(2):
            g = torch.tensor([((7 * j + 3 * step + 5 * k) % 17 - 8) / 20.0 for j in range(n)], dtype=torch.float32)
            q, residuals[k] = compression.quantize(g, residuals[k], th)
            total = total + compression.unpack_2bit(compression.pack_2bit(q), n).float() * th
        assert torch.equal(total, torch.tensor(expected, dtype=torch.float32) * th32), f"step {step}"


def test_quantize_matches_a_float64_reference_over_steps():
    th = 0.3
    gen = torch.Generator().manual_seed(0)
    r32, r64 = torch.zeros(50), torch.zeros(50, dtype=torch.float64)
    for _ in range(5):
        g = torch.randint(-40, 41, (50,), generator=gen) / 64.0
        q, r32 = compression.quantize(g, r32, th)
        res = r64 + g.double()
        q64 = torch.where(res >= th, 1, torch.where(res <= -th, -1, 0))
        r64 = res - q64 * th
        assert torch.equal(q.long(), q64)
        torch.testing.assert_close(r32.double(), r64, rtol=0, atol=1e-6)


def test_sign_packing_and_vote():
    x = torch.tensor([0.5, -1.0, 0.0, -0.0, 2.0, -3.0, 1.0, -1.0, 7.0, -7.0, 0.1])
    packed = signs.pack_signs(x)
    assert packed.numel() == 2 and packed.dtype == torch.uint8
    assert signs.unpack_signs(packed, 11).tolist() == [1, -1, 1, 1, 1, -1, 1, -1, 1, -1, 1]
    gathered = torch.stack([packed, signs.pack_signs(-x), signs.pack_signs(torch.ones(11))])
    assert signs.vote(gathered, 11).tolist() == [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]
    assert signs.vote(gathered[:2], 11).tolist() == [0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0]  # ties stay put


# ---------------------------------------------------------------------- errors
@pytest.mark.parametrize("params, match", [
    ({"type": "1bit"}, r"compression_params\['type'\]='1bit'.*only '2bit'"),
    ({"threshold": 0.5}, r"compression_params\['type'\] is missing"),
    ({"type": "2bit", "threshold": 0}, r"compression_params\['threshold'\]=0 is invalid"),
    ({"type": "2bit", "threshold": -1.0}, r"compression_params\['threshold'\]=-1.0 is invalid"),
    ({"type": "2bit", "thresh": 1.0}, r"unknown key\(s\) \['thresh'\]"),
])
def test_bad_compression_params_name_the_key(params, match):
    with pytest.raises(ValueError, match=match):
        optzoo.kvstore.create("dist_sync", compression_params=params)
    with pytest.raises(ValueError, match=match):
        optzoo.Trainer([torch.nn.Parameter(torch.zeros(2))], "sgd", kvstore="dist_sync", compression_params=params)


def test_kvstore_argument_errors(monkeypatch):
    p = [torch.nn.Parameter(torch.zeros(2))]
    for kind in ("nccl", "horovod"):
        with pytest.raises(NotImplementedError, match=f"kvstore='{kind}' is not supported"):
            optzoo.Trainer(p, "sgd", kvstore=kind)
    with pytest.raises(ValueError, match="gradient compression needs a distributed kvstore"):
        optzoo.Trainer(p, "sgd", kvstore="local", compression_params={"type": "2bit"})
    with pytest.raises(ValueError, match="update_on_kvstore=True is invalid with kvstore 'dist_sync'"):
        optzoo.Trainer(p, "sgd", kvstore="dist_sync", update_on_kvstore=True)
    with pytest.raises(ValueError, match="already send 1-bit signs"):
        optzoo.Trainer(p, "signum", kvstore="dist_sync", compression_params={"type": "2bit"})
    with pytest.raises(ValueError, match="timeout=0 is invalid"):
        optzoo.kvstore.create("dist_sync", timeout=0)
    monkeypatch.setenv("OPTZOO_DIST_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="OPTZOO_DIST_TIMEOUT='soon' is invalid"):
        optzoo.kvstore.create("dist_sync")
    monkeypatch.delenv("OPTZOO_DIST_TIMEOUT")
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(RuntimeError, match="no torch.distributed process group and no RANK, WORLD_SIZE"):
        optzoo.Trainer(p, "sgd", kvstore="dist_sync_device")
