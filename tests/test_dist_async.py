"""kvstore='dist_async': the parameter server's update rule (in-process, against float64 references) and
real 3-process jobs (1 server + 2 workers on 127.0.0.1) that must reach the closed-form least-squares
solution, lose no push, and fail fast with a DistributedError naming rank 0 when the server is missing.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import optzoo
from optzoo import _io
from optzoo.optimizer.updater import dump_optimizer, get_updater
from optzoo.kvstore import dist_async, ps
from optzoo.kvstore.dist_async import ParameterServer
import dist_common

HERE = os.path.dirname(os.path.abspath(__file__))
JOB_TIMEOUT = 60  # seconds: a hung job is killed and fails the test


# ============================================================================ the server rule, in-process
def _server(opt, names, values, workers=2):
    server = ParameterServer(workers)
    server.set_optimizer(0, dump_optimizer(opt))
    for w in range(workers):
        server.init(w, names, values)
    return server


def _dcasgd_ref(w, g, w_bak, mom, *, lr, wd, lamda, mu, rg):
    """Zheng et al.'s rule with worker m's backup, float64: returns (w, mom)."""
    G = rg * g
    d = -lr * (G + wd * w + lamda * G * G * (w - w_bak))
    if mu:
        d = mu * mom + d
    return w + d, d


@pytest.mark.parametrize("mu", [0.0, 0.9])
@pytest.mark.parametrize("k", [1, 10])
def test_dcasgd_compensates_with_the_pushing_workers_backup(mu, k):
    """Scripted arrivals: worker 0 pushes twice, then worker 1 pushes a gradient taken at w0 and must be
    compensated with w - w0 (its backup), not with w - w1 (the single-process w_prev); a pull moves the
    backup. ``k`` tensors per push, each compensated with its own backup."""
    hp = dict(learning_rate=0.1, wd=0.01, lamda=0.7, momentum=mu)
    gen = torch.Generator().manual_seed(3)
    names = [f"w{j}" for j in range(k)]
    w0 = [torch.randn(5, dtype=torch.float64, generator=gen) for _ in names]
    server = _server(optzoo.create("dcasgd", **hp), names, w0)
    order = [(0, "push"), (0, "push"), (1, "push"), (1, "pull"), (0, "push"), (1, "push"), (1, "push")]
    w, mom = [x.clone() for x in w0], [torch.zeros(5, dtype=torch.float64) for _ in names]
    backup = {0: [x.clone() for x in w0], 1: [x.clone() for x in w0]}
    single = [x.clone() for x in w0]  # the single-process rule on the same arrivals (w_prev = weight before
    single_updater = get_updater(optzoo.create("dcasgd", **hp, rescale_grad=0.5))  # the last update)
    for worker, what in order:
        if what == "pull":
            got = server.pull(worker, names)
        else:
            g = [torch.randn(5, dtype=torch.float64, generator=gen) for _ in names]
            got = server.push(worker, names, g, 0.5)
            for j in range(k):
                w[j], mom[j] = _dcasgd_ref(w[j], g[j], backup[worker][j], mom[j], lr=0.1, wd=0.01, lamda=0.7,
                                           mu=mu, rg=0.5)
            single_updater(list(range(k)), g, single)
        backup[worker] = [x.clone() for x in w]
        for x, y in zip(got, w):
            torch.testing.assert_close(x, y, rtol=1e-13, atol=1e-14)
    assert server.stats[0]["updates_applied"] == 3 and server.stats[1]["updates_applied"] == 3
    # the script does tell the two rules apart
    assert (single[0] - w[0]).abs().max() > 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dcasgd_alternating_workers_are_the_single_process_rule(dtype):
    """Two workers pushing in strict alternation: each one's backup is the weight before the last update,
    exactly the single-process DCASGD's w_prev, so the server reproduces the local Updater bit for bit
    (with momentum; fp16 with multi_precision: the backups are fp32 master copies). One worker alone has
    no delay: w = w_bak, no compensation (the rule with lamda = 0)."""
    hp = dict(learning_rate=0.05, wd=0.001, lamda=2.0, momentum=0.5, multi_precision=dtype == torch.float16)
    gen = torch.Generator().manual_seed(4)
    w0 = [torch.randn(3, 4, generator=gen).to(dtype), torch.randn(7, generator=gen).to(dtype)]
    two = _server(optzoo.create("dcasgd", **hp), ["a", "b"], w0, workers=2)
    one = _server(optzoo.create("dcasgd", **hp), ["a", "b"], w0, workers=1)
    local, local0 = [w.clone() for w in w0], [w.clone() for w in w0]
    updater = get_updater(optzoo.create("dcasgd", **hp, rescale_grad=0.25))
    updater0 = get_updater(optzoo.create("dcasgd", **dict(hp, lamda=0.0), rescale_grad=0.25))
    for step in range(8):
        grads = [torch.randn(w.shape, generator=gen).to(dtype) for w in w0]
        got, got0 = two.push(step % 2, ["a", "b"], grads, 0.25), one.push(0, ["a", "b"], grads, 0.25)
        updater([0, 1], grads, local)
        updater0([0, 1], grads, local0)
        for x, y, x0, y0 in zip(got, local, got0, local0):
            assert torch.equal(x, y) and torch.equal(x0, y0)
    assert (local[0].float() - local0[0].float()).abs().max() > 1e-4  # the compensation did act


def test_server_waits_for_every_close_and_names_the_silent():
    server = ParameterServer(2)
    server._seen(0, closing=True)
    server._seen(1)
    assert server.wait_closed(0.3) == [1]
    server._seen(1, closing=True)
    assert server.wait_closed(0.3) == []


def test_other_optimizers_run_unchanged_and_nothing_is_lost():
    """Adam on the server: interleaved pushes from 2 workers equal one local Updater fed the pushes in
    arrival order (the server's copy is the only weight); every push is one counted update."""
    hp = dict(learning_rate=0.01, wd=0.1)
    gen = torch.Generator().manual_seed(5)
    w0 = torch.randn(6, generator=gen)
    server = _server(optzoo.create("adam", **hp), ["w"], [w0])
    local = w0.clone()
    updater = get_updater(optzoo.create("adam", **hp))
    for worker in [0, 1, 1, 0, 1, 0, 0]:
        g = torch.randn(6, generator=gen)
        updater.optimizer.rescale_grad = 1 / (worker + 2)
        updater(0, g, local)
        (got,) = server.push(worker, ["w"], [g], 1 / (worker + 2))
        assert torch.equal(got, local)
    s = server.summary()
    assert s["pushes_received"] == s["updates_applied"] == 7
    assert [s["workers"][w]["updates_applied"] for w in (0, 1)] == [4, 3]


def test_multipliers_and_learning_rate_travel_with_the_push():
    server = _server(optzoo.create("sgd", learning_rate=1.0), ["a", "b"], [torch.zeros(2), torch.zeros(2)], 1)
    got = server.push(0, ["a", "b"], [torch.ones(2), torch.ones(2)], 1.0, lr=0.5, mults=[(2.0, 1.0), None])
    torch.testing.assert_close(got[0], torch.full((2,), -1.0))
    torch.testing.assert_close(got[1], torch.full((2,), -0.5))


def test_first_registration_wins():
    server = ParameterServer(2)
    assert torch.equal(server.init(0, ["a"], [torch.ones(2)])[0], torch.ones(2))
    assert torch.equal(server.init(1, ["a"], [torch.zeros(2)])[0], torch.ones(2))


def test_server_rejects_inconsistent_workers():
    server = _server(optzoo.create("sgd"), ["a"], [torch.zeros(2)], 2)
    with pytest.raises(ValueError, match="same optimizer"):
        server.set_optimizer(1, dump_optimizer(optzoo.create("adam")))
    server.set_optimizer(1, dump_optimizer(optzoo.create("sgd")))  # the same one: accepted
    with pytest.raises(ValueError, match="same names"):
        server.init(1, ["b"], [torch.zeros(2)])
    with pytest.raises(ValueError, match="shape"):
        server.init(1, ["a"], [torch.zeros(3)])
    with pytest.raises(KeyError, match="never registered"):
        server.push(1, ["zzz"], [torch.zeros(2)], 1.0)
    with pytest.raises(ValueError, match="gradient of 'a' has shape"):
        server.push(1, ["a"], [torch.zeros(5)], 1.0)


# ============================================================================ the worker side, in-process
_loopback = dist_common.loopback


class _Info:
    def __init__(self, lr_mult, wd_mult):
        self.lr_mult, self.wd_mult = lr_mult, wd_mult


def test_worker_pushpull_sends_its_live_settings():
    """The Trainer's param_dict multipliers and set_learning_rate reach the server with every push; the
    pulled weights land in the parameters in place; counters count."""
    kv = _loopback(ParameterServer(1))
    opt = optzoo.create("sgd", learning_rate=1.0, wd=0.5)
    opt.param_dict = {1: _Info(2.0, 0.0)}
    kv.set_optimizer(opt)
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))
    kv.init(["a", "b"], [a, b])
    opt.set_learning_rate(0.5)
    a.grad, b.grad = torch.ones(2), torch.ones(3)
    kv.pushpull([0, 1], [a, b], 0.25)
    # a: 1 - 0.5*(0.25 + 0.5*1); b: lr_mult 2, wd_mult 0: 1 - 1.0*0.25
    torch.testing.assert_close(a.detach(), torch.full((2,), 0.625))
    torch.testing.assert_close(b.detach(), torch.full((3,), 0.75))
    assert (kv.pushes_sent, kv.bytes_sent) == (1, 5 * 4)
    assert kv.server_stats()["updates_applied"] == 1
    with pytest.raises(KeyError, match="never registered"):
        kv._call("push", ["nope"], [torch.ones(1)], 1.0)
    with pytest.raises(ValueError, match=r"\['b'\] have no gradient"):
        b.grad = None
        kv.pushpull([1], [b], 1.0)
    kv.close()
    with pytest.raises(RuntimeError, match="closed"):
        kv.pushpull([0], [a], 1.0)


def test_optimizer_states_round_trip_through_a_file(tmp_path):
    """save_optimizer_states / load_optimizer_states: a fresh server loaded from the file continues
    exactly as the original (Adam moments and update counts included)."""
    gen = torch.Generator().manual_seed(6)
    first = ParameterServer(1)
    kv = _loopback(first)
    kv.set_optimizer(optzoo.create("adam", learning_rate=0.01))
    p = torch.nn.Parameter(torch.randn(4, generator=gen))
    kv.init(["p"], [p])
    for _ in range(3):
        p.grad = torch.randn(4, generator=gen)
        kv.pushpull([0], [p], 0.5)
    kv.save_optimizer_states(tmp_path / "opt.states")
    second = ParameterServer(1)
    kv2 = _loopback(second)
    kv2.set_optimizer(optzoo.create("adam", learning_rate=0.01))
    q = torch.nn.Parameter(p.detach().clone())
    kv2.init(["p"], [q])
    kv2.load_optimizer_states(tmp_path / "opt.states")
    assert second.optimizer.num_update == 3
    g = torch.randn(4, generator=gen)
    (x,) = first.push(0, ["p"], [g], 0.5)
    (y,) = second.push(0, ["p"], [g], 0.5)
    assert torch.equal(x, y)
    other = _loopback(_server(optzoo.create("adam", learning_rate=0.01), ["q"], [torch.zeros(4)], 1))
    with pytest.raises(ValueError, match=r"states are for parameters \['p'\]"):
        other.load_optimizer_states(tmp_path / "opt.states")
    (tmp_path / "bad").write_bytes(b"junk")
    with pytest.raises(ValueError, match="could not be read"):
        kv2.load_optimizer_states(tmp_path / "bad")


def test_trainer_steps_through_the_store(tmp_path):
    """optzoo.Trainer(kvstore=<a DistAsync>): one worker on the server equals the local Trainer (Adam, with a
    multiplier); save_states / load_states go through the server; update() is refused."""
    gen = torch.Generator().manual_seed(8)
    init = {"fc.bias": torch.randn(2, generator=gen), "fc.weight": torch.randn(2, 3, generator=gen)}
    hp = {"learning_rate": 0.01, "wd": 0.1}

    def make(kvstore, values=init):
        params = {n: torch.nn.Parameter(v.detach().clone()) for n, v in values.items()}
        trainer = optzoo.Trainer(params, "adam", hp, kvstore=kvstore)
        trainer.set_lr_mult({"fc.bias": 3.0})
        return trainer, list(params.values())

    def steps(trainer, params, n):
        for _ in range(n):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            trainer.step(4)

    def same_steps(a, pa, b, pb, n):  # both get the same gradients
        state = gen.get_state()
        steps(a, pa, n)
        gen.set_state(state)
        steps(b, pb, n)
        for x, y in zip(pa, pb):
            assert torch.equal(x, y)

    remote, rparams = make(_loopback(ParameterServer(1)))
    local, lparams = make(None)
    same_steps(remote, rparams, local, lparams, 3)
    assert remote.kvstore.pushes_sent == 3
    with pytest.raises(RuntimeError, match="updates on the kvstore"):
        remote.update(4)
    remote.save_states(tmp_path / "t.states")
    # resume: the model's weights first (the first worker registers them), then the server's states
    again, aparams = make(_loopback(ParameterServer(1)), dict(zip(init, rparams)))
    again.load_states(tmp_path / "t.states")
    same_steps(remote, rparams, again, aparams, 2)


# ============================================================================ real processes
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp_path, opt, mode, ranks=(0, 1, 2)):
    """One launcher process that forks the ranks; returns it (its children's pids: ``_pids``)."""
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""), OUTDIR=str(tmp_path),
               OMP_NUM_THREADS="1", TORCH_CPP_LOG_LEVEL="ERROR", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
               WORLD_SIZE="3")
    return subprocess.Popen([sys.executable, os.path.join(HERE, "dist_async_worker.py"), f"tcp://127.0.0.1:{port}",
                             str(tmp_path), opt, mode, ",".join(map(str, ranks))],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _pids(tmp_path):
    path = tmp_path / "pids.json"
    return {int(r): pid for r, pid in json.loads(path.read_text()).items()} if path.exists() else {}


def _wait(proc, tmp_path, timeout=JOB_TIMEOUT):
    """The launcher's exit code and output; everything is killed past ``timeout``."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in _pids(tmp_path).values():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.kill()
        proc.wait()
    return proc.returncode, proc.stdout.read().decode(errors="replace")


def _when_ready(proc, tmp_path, ranks=(1, 2)):
    deadline = time.monotonic() + 30
    while not all((tmp_path / f"ready{r}").exists() for r in ranks):
        if time.monotonic() > deadline or proc.poll() is not None:
            _wait(proc, tmp_path, timeout=0.1)
            pytest.fail("the job did not start")
        time.sleep(0.05)
    return _pids(tmp_path)


@pytest.mark.parametrize("opt, mode", [("sgd", "trainer"), ("dcasgd", "kv")])
def test_three_processes_reach_the_least_squares_solution(tmp_path, opt, mode):
    """1 server + 2 workers, each on its own shard ('trainer': optzoo.Trainer(kvstore='dist_async') from
    torchrun's environment variables; 'kv': the store driven directly)."""
    from dist_async_worker import D, problem
    code, out = _wait(_launch(tmp_path, opt, mode), tmp_path)
    assert code == 0, out[-3000:]
    X, y = problem()
    A = torch.cat([X, torch.ones(len(X), 1, dtype=X.dtype)], 1)
    solution = torch.linalg.lstsq(A, y[:, None]).solution.ravel()  # closed form, float64
    server = json.loads((tmp_path / "server.json").read_text())
    workers = [torch.load(tmp_path / f"worker{r}.pt") for r in (1, 2)]
    sent = sum(w["pushes_sent"] for w in workers)
    assert sent == 2 * 150
    assert server["pushes_received"] == server["updates_applied"] == sent
    assert [server["workers"][str(k)]["updates_applied"] for k in (0, 1)] == [150, 150]
    for w in workers:
        got = torch.cat([w["w"].ravel(), w["b"]]).double()
        assert (got - solution).norm() < 1e-4, (got, solution)
        assert w["w"].shape == (1, D)
    if mode == "trainer":  # Trainer.save_states wrote the server's optimizer states
        for r in (1, 2):
            blob = _io.safe_load(tmp_path / f"trainer{r}.states", dist_async._STATES_FORMAT, "states")
            updater = get_updater(optzoo.create(opt))
            updater.set_states(blob["updater"].numpy().tobytes())
            assert type(updater.optimizer).__name__ == "SGD" and updater.optimizer.lr == 0.1
            assert 150 <= updater.optimizer.num_update <= 300


def test_worker_without_server_fails_fast_naming_rank_0(tmp_path):
    _wait(_launch(tmp_path, "sgd", "noserver", ranks=(1,)), tmp_path, timeout=30)
    res = torch.load(tmp_path / "worker1.pt")
    assert res["error"].startswith("DistributedError") and "rank 0" in res["error"], res["error"]
    assert res["seconds"] < 1.5 + 5


def test_worker_fails_fast_when_the_server_dies(tmp_path):
    proc = _launch(tmp_path, "sgd", "killserver")
    os.kill(_when_ready(proc, tmp_path)[0], signal.SIGKILL)
    killed = time.time()
    _wait(proc, tmp_path, timeout=30)
    for r in (1, 2):
        res = torch.load(tmp_path / f"worker{r}.pt")
        assert res["error"].startswith("DistributedError") and "rank 0" in res["error"], res["error"]
        assert res["at"] - killed < 3 + 5, res


def test_server_names_a_dead_worker_and_the_others_fail_fast(tmp_path):
    """SIGKILL worker rank 2: the server (silence timeout 3 s) raises a DistributedError naming rank 2,
    then the surviving worker fails naming rank 0; nobody hangs."""
    proc = _launch(tmp_path, "sgd", "killworker")
    os.kill(_when_ready(proc, tmp_path)[2], signal.SIGKILL)
    killed = time.time()
    _wait(proc, tmp_path, timeout=30)
    server = json.loads((tmp_path / "server.json").read_text())
    assert server["error"].startswith("DistributedError") and server["ranks"] == [2], server
    assert server["at"] - killed < 3 + 3, server
    res = torch.load(tmp_path / "worker1.pt")
    assert res["error"].startswith("DistributedError") and "rank 0" in res["error"], res["error"]
    assert res["at"] - killed < 3 + 3 + 5, res
