"""Row-sparse gradients (``nn.Embedding(sparse=True)``) over the distributed kvstores (issue 13).

dist_sync: 2 real gloo workers each on a slice of every batch equal one process on the whole batch (SGD
momentum and Adam lazy, AdaGrad, Adam standard), the gradients stay row-sparse, ``bytes_sent`` is the id +
row payload; 2-bit compression and the Signum vote refuse on every worker; a malformed gradient on one
worker makes every worker raise at once. dist_async: the server's lazy update from the pushed rows (in
process, against a local reference) and a real job of 1 server + 2 workers.
"""
import os
import socket
import subprocess
import sys

import pytest
import torch

import optzoo
from optzoo.kvstore import dist_async, ps
from optzoo.kvstore.dist_async import ParameterServer
from optzoo.optimizer.updater import dump_optimizer
import dist_common
import dist_sparse_worker as W

HERE = os.path.dirname(os.path.abspath(__file__))
WORLD = 2
ROW_BYTES = 8 + 4 * W.DIM  # one int64 id and one fp32 row of the table
DENSE_BYTES = 4 * (W.DIM + 1)  # fc.weight and fc.bias, summed densely


@pytest.fixture(scope="module")
def launched():
    results = dist_common.run(W.everything, WORLD, timeout=90)
    failed = [r for r in results if not isinstance(r, dict)]
    assert not failed, f"workers failed: {failed} {[getattr(f, 'traceback', '') for f in failed]}"
    return results


def _sparse(ids, values, shape=(W.VOCAB, W.DIM)):
    return torch.sparse_coo_tensor(ids.unsqueeze(0), values, shape, check_invariants=False)


# ---------------------------------------------------------------------- dist_sync: N workers == one process
@pytest.mark.parametrize("cfg", W.CONFIGS, ids=[c[0] for c in W.CONFIGS])
def test_workers_on_slices_equal_one_process_on_the_batch(launched, cfg):
    ref = W.train(0, 1, cfg)["weights"]  # one process, the whole batch, no kvstore
    init = dict(W.model().named_parameters())
    touched = sorted({i for step in W.IDS for part in step for s in (part or []) for i in s})
    untouched = [r for r in range(W.VOCAB) if r not in touched]
    ours = [r["train"][cfg[0]]["weights"] for r in launched]
    for name in W.NAMES:
        assert torch.equal(ours[1][name], ours[0][name]), f"{cfg[0]}: the workers hold other {name}"
        assert not torch.equal(ref[name], init[name].detach()), f"{cfg[0]}: {name} did not move"
        # the summed gradients add the same numbers as one process in another order (each worker coalesces
        # its rows and the linear layer's terms first): equal up to float rounding, not bit for bit. AdaGrad's
        # g / sqrt(h) passes a gradient's rounding on at full size where its terms nearly cancel: 4e-7 on one
        # of fc.weight's 8 values on a 2-core AMD EPYC (a sum missing a worker's terms changes steps of ~lr = 0.1)
        torch.testing.assert_close(ours[0][name], ref[name], rtol=1e-6, atol=1e-6)
    emb, ref_emb, init_emb = ours[0][W.EMB], ref[W.EMB], init[W.EMB].detach()
    if cfg[2].get("lazy_update", True):  # lazy: rows nobody touched are bit for bit the start
        assert torch.equal(emb[untouched], init_emb[untouched]) and torch.equal(ref_emb[untouched], init_emb[untouched])
    else:  # standard: weight decay moves every row, on the workers as in one process
        assert not torch.equal(emb[untouched], init_emb[untouched])


def test_bytes_sent_is_the_id_and_row_payload(launched):
    for r in launched:
        for cfg in W.CONFIGS:
            got = r["train"][cfg[0]]["bytes"]
            want, total = [], 0
            for step in range(W.STEPS):
                top = max(W.distinct_rows(step, rank) for rank in range(WORLD))  # padded to the largest count
                total += ROW_BYTES * top + DENSE_BYTES
                want.append(total)
            assert got == want, cfg[0]
            table = W.VOCAB * W.DIM * 4
            assert max(b - a for a, b in zip([0] + got, got)) < table / 50  # far below densifying the table


def test_summed_gradient_is_the_coalesced_sum_bit_for_bit(launched):
    # dyadic values: any summation order gives the same floats, so the rows must match exactly
    for step in range(W.STEPS):
        parts = [W._dyadic(ids, rank) for rank, ids in enumerate(W.IDS[step]) if ids is not None]
        want = torch.sparse_coo_tensor(torch.cat([p._indices() for p in parts], 1),
                                       torch.cat([p._values() for p in parts]), (W.VOCAB, W.DIM),
                                       check_invariants=False).coalesce()
        for r in launched:
            got = r["sums"]["sparse"][step]
            assert got.layout == torch.sparse_coo and got.is_coalesced()
            assert torch.equal(got._indices(), want._indices()) and torch.equal(got._values(), want._values())
            top = max(W.distinct_rows(step, rank) for rank in range(WORLD))
            assert r["sums"]["bytes"][step] == ROW_BYTES * top + 3 * 4
    # one worker's gradient is dense: every worker densifies and sums densely
    want = (W._dyadic(W.IDS[0][0], 0) + W._dyadic(W.IDS[0][1], 1)).to_dense()
    for r in launched:
        assert r["sums"]["dense"].layout == torch.strided and torch.equal(r["sums"]["dense"], want)


# ---------------------------------------------------------------------- dist_sync: refusals, all-or-nothing
@pytest.mark.parametrize("kind, what", [("twobit", "2-bit compression"), ("signum", "Signum's sign vote")])
def test_compression_and_sign_votes_refuse_on_every_worker(launched, kind, what):
    # the table's gradient is row-sparse on rank 0 and absent on rank 1: both refuse alike, nothing changes
    for r in launched:
        typ, message, _ = r["refusals"][kind]
        assert typ == "ValueError" and f"parameter {W.EMB!r} is row-sparse" in message and what in message
        assert r["refusals"][kind + "_unchanged"] and r["refusals"][kind + "_states"] == 0


def test_a_malformed_gradient_on_one_worker_fails_every_worker_at_once(launched):
    bad, other = launched[1]["refusals"], launched[0]["refusals"]
    assert bad["bad"][0] == "ValueError" and f"parameter {W.EMB!r} is sparse with sparse_dim 2" in bad["bad"][1]
    assert other["bad"][0] == "DistributedError" and other["bad"][2] == (1,)
    assert f"rank(s) [1] refused the row-sparse gradient of {W.EMB!r}" in other["bad"][1]
    for r in launched:
        assert r["refusals"]["bad_unchanged"] and r["refusals"]["bad_seconds"] < 5
    # the store is intact: the next good step runs, the same as one process on the whole batch
    m = W.model()
    trainer = optzoo.Trainer(dict(m.named_parameters()), "adam", {"learning_rate": 0.1})
    W.forward_loss(m, W.IDS[0][0] + W.IDS[0][1], torch.cat([W.targets(0, 2)] * 2)).backward()
    trainer.step(4)
    for n, p in m.named_parameters():
        assert torch.equal(launched[0]["refusals"]["after"][n], launched[1]["refusals"]["after"][n])
        torch.testing.assert_close(launched[0]["refusals"]["after"][n], p.detach(), rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------- dist_async: the server, in process
_loopback = dist_common.loopback


@pytest.mark.parametrize("name, hp", [("sgd", {"momentum": 0.9, "wd": 0.01}), ("adam", {"wd": 0.01}),
                                      ("adagrad", {}), ("adam", {"lazy_update": False})])
def test_server_applies_pushed_rows_as_the_local_optimizer(name, hp):
    """Two workers push their touched rows in turn; the server's weights and states equal one local optimizer
    fed the same row-sparse gradients in the same order, bit for bit; each worker pulls back exactly its
    rows and keeps the rest as it last had them; bytes_sent counts ids + rows."""
    gen = torch.Generator().manual_seed(5)
    init = torch.randn(W.VOCAB, W.DIM, generator=gen)
    server = ParameterServer(2)
    kvs = [_loopback(server, k) for k in range(2)]
    ws = [torch.nn.Parameter(init.clone()) for _ in kvs]
    for kv, w in zip(kvs, ws):
        kv.set_optimizer(optzoo.create(name, learning_rate=0.1, **hp))
        kv.init([W.EMB], [w])
    ref_opt = optzoo.create(name, learning_rate=0.1, **hp)
    ref_w = init.clone()
    ref_state = ref_opt.create_state_multi_precision(0, ref_w)
    pushes = [(0, [3, 1, 3]), (1, [3, 999]), (0, []), (1, [7]), (0, [1, 7, 500])]
    want_bytes = [0, 0]
    for worker, ids in pushes:
        ids = torch.tensor(ids, dtype=torch.int64)
        g = _sparse(ids, torch.randn(ids.numel(), W.DIM, generator=gen))
        w, before = ws[worker], ws[worker].detach().clone()
        w.grad = g
        kvs[worker].pushpull([0], [w], 0.5)
        ref_opt.rescale_grad = 0.5
        ref_opt.update_multi_precision(0, ref_w, g, ref_state)
        assert torch.equal(server.weights[W.EMB], ref_w)
        rows = ids.unique()
        want = before.clone()
        want[rows] = ref_w[rows]  # pulled: the touched rows only; the others stay as this worker had them
        assert torch.equal(w.detach(), want)
        want_bytes[worker] += rows.numel() * (8 + 4 * W.DIM)
        assert kvs[worker].bytes_sent == want_bytes[worker]
    states = server.updater.states[0]
    for a, b in zip(states if isinstance(states, tuple) else (states,),
                    ref_state if isinstance(ref_state, tuple) else (ref_state,)):
        assert torch.equal(a, b)
    assert server.summary()["updates_applied"] == len(pushes)
    # row_sparse_pull refreshes the rows a worker asks for (the ones it is about to look up)
    kvs[1].row_sparse_pull([0], [ws[1]], [torch.tensor([1, 500])])
    assert torch.equal(ws[1].detach()[[1, 500]], ref_w[[1, 500]])


def test_server_refuses_sparse_pushes_it_cannot_apply_before_anything_changes():
    server = ParameterServer(1)
    kv = _loopback(server, 0)
    kv.set_optimizer(optzoo.create("adagrad", learning_rate=0.1, wd=0.1))  # MXNet's sparse AdaGrad refuses wd
    w, b = torch.nn.Parameter(torch.ones(10, 2)), torch.nn.Parameter(torch.ones(2))
    kv.init(["b", W.EMB], [b, w])
    w.grad, b.grad = _sparse(torch.tensor([1]), torch.ones(1, 2), (10, 2)), torch.ones(2)
    with pytest.raises(ValueError, match="AdaGrad's row-sparse update does not support weight decay"):
        kv.pushpull([0, 1], [b, w], 1.0)
    assert torch.equal(server.weights[W.EMB], torch.ones(10, 2)) and torch.equal(server.weights["b"], torch.ones(2))
    assert server.updater.states == {} and server.optimizer.num_update == 0
    # malformed pushes: rows out of range, rows of the wrong width
    server = ParameterServer(1)
    server.set_optimizer(0, dump_optimizer(optzoo.create("sgd", learning_rate=0.1)))
    server.init(0, [W.EMB], [torch.ones(10, 2)])
    with pytest.raises(ValueError, match=r"row ids of 'emb.weight' outside \[0, 10\)"):
        server.push(0, [W.EMB], [("rows", torch.tensor([10]), torch.ones(1, 2))], 1.0)
    with pytest.raises(ValueError, match=r"rows of 'emb.weight' have shape \(1, 3\): expected \(1, 2\)"):
        server.push(0, [W.EMB], [("rows", torch.tensor([1]), torch.ones(1, 3))], 1.0)
    assert torch.equal(server.weights[W.EMB], torch.ones(10, 2)) and server.summary()["updates_applied"] == 0
    # a worker's gradient that is not row-sparse is refused before anything is sent
    kv = _loopback(server, 0)
    kv.init([W.EMB], [w])
    w.grad = torch.ones(10, 2).to_sparse(2)
    received = server.summary()["pushes_received"]
    with pytest.raises(ValueError, match="sparse with sparse_dim 2"):
        kv.pushpull([0], [w], 1.0)
    assert kv.pushes_sent == 0 and server.summary()["pushes_received"] == received


def test_dcasgd_compensates_with_the_rows_the_worker_holds():
    """DCASGD updates every row (the standard way) but a worker pulls only its rows: the server's backup of
    that worker (its w_bak) is what the worker holds, stale rows included."""
    gen = torch.Generator().manual_seed(9)
    server = ParameterServer(1)
    kv = _loopback(server, 0)
    kv.set_optimizer(optzoo.create("dcasgd", learning_rate=0.1, wd=0.1, lamda=0.5))
    w = torch.nn.Parameter(torch.randn(20, 3, generator=gen))
    kv.init([W.EMB], [w])
    for ids in ([2, 5, 5], [5, 7], [], [0, 19]):
        ids = torch.tensor(ids, dtype=torch.int64)
        before = w.detach().clone()
        w.grad = _sparse(ids, torch.randn(ids.numel(), 3, generator=gen), (20, 3))
        kv.pushpull([0], [w], 1.0)
        assert torch.equal(server.backups[(0, W.EMB)], w.detach())
        untouched = [r for r in range(20) if r not in ids.tolist()]
        assert torch.equal(w.detach()[untouched], before[untouched])  # stale here, moved by wd on the server
        assert not torch.equal(server.weights[W.EMB][untouched], before[untouched])


# ---------------------------------------------------------------------- dist_async: a real job
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("late", [0, 2], ids=["together", "rank2_late"])
def test_dist_async_job_pushes_and_pulls_touched_rows(tmp_path, late):
    """1 server + 2 workers (TensorPipe rpc): plain lazy SGD on dyadic row-sparse gradients is exact in any
    arrival order, so the server ends at init - lr * (every push's gradient); a worker's rows nobody else
    touches follow its own pushes exactly, and rows only the other worker touches stay stale on it (as the
    server had them when it registered: ``late`` makes worker 2 register after worker 1's first two pushes,
    as a slow start on a loaded machine does)."""
    env = dict(os.environ, PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               TORCH_CPP_LOG_LEVEL="ERROR", ASYNC_LATE_RANK=str(late))
    proc = subprocess.run([sys.executable, os.path.join(HERE, "dist_sparse_worker.py"),
                           f"tcp://127.0.0.1:{_free_port()}", str(tmp_path)], env=env, capture_output=True,
                          timeout=60)
    assert proc.returncode == 0, (proc.stdout + proc.stderr).decode(errors="replace")[-3000:]
    outs = {r: torch.load(tmp_path / f"worker{r}.pt") for r in (1, 2)}
    stats = torch.load(tmp_path / "server.pt")
    assert stats["pushes_received"] == stats["updates_applied"] == 6
    start = outs[1]["final"][100] - W.async_init()[100]  # the first registration won: init + its rank
    winner = W.async_init() + start[0]
    total = torch.zeros(W.VOCAB, W.DIM)
    own = {1: torch.zeros(W.VOCAB, W.DIM), 2: torch.zeros(W.VOCAB, W.DIM)}
    for rank, steps in W.ASYNC_IDS.items():
        for step in range(len(steps)):
            g = W.async_grad(rank, step).to_dense()
            total += g
            own[rank] += g
            mine = {i for s in steps[:step + 1] for i in s}
            theirs = {i for s in W.ASYNC_IDS[3 - rank] for i in s}
            after = outs[rank]["after_push"][step]
            for row in mine - theirs:  # only this worker moves it: pulled back after every push
                assert torch.equal(after[row], winner[row] - W.ASYNC_LR * own[rank][row])
            other = 3 - rank
            for row in theirs - mine:  # never pulled by this worker: the server's row when it registered, stale
                # (a worker that starts late registers after some of the other's pushes: a prefix of them)
                seen = [winner[row] - W.ASYNC_LR * sum((W.async_grad(other, s).to_dense()[row] for s in range(k)),
                                                       torch.zeros(W.DIM))
                        for k in range(len(W.ASYNC_IDS[other]) + 1)]
                assert any(torch.equal(after[row], v) for v in seen), (rank, step, row)
                assert torch.equal(after[row], outs[rank]["after_push"][0][row])  # and it stays as it was
            pushed = len(set(steps[step]))
            assert outs[rank]["bytes"][step] - (outs[rank]["bytes"][step - 1] if step else 0) == \
                pushed * (8 + 4 * W.DIM) + 2 * 4
    for rank in (1, 2):
        assert torch.equal(outs[rank]["final"], winner - W.ASYNC_LR * total)
