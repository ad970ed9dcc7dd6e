"""Run by test_dist_async.py in fresh processes: one dist_async server or worker on least squares.

``python dist_async_worker.py INIT_METHOD OUTDIR OPTIMIZER MODE RANKS`` (RANKS: e.g. ``0,1,2`` of a world of 3)

Rank 0 serves and writes OUTDIR/server.json (its counters). Ranks 1.. each train on their own shard of
one noise-free least-squares problem (so every shard's minimiser is the global one and async updates
converge to it exactly), then write OUTDIR/worker{rank}.pt (final weights, pushes sent, server stats).
MODE is 'kv' (the DistAsync store directly), 'trainer' (optzoo.Trainer(kvstore='dist_async')) or a fault
case: 'noserver', 'killserver', 'killworker' (the test kills a process; the others write their error and when
it came).
"""
import json
import os
import sys
import time

import torch

torch.set_num_threads(1)

import optzoo  # noqa: E402
from optzoo.kvstore.dist_async import DistAsync, run_server  # noqa: E402

import dist_common  # noqa: E402

D, ROWS, BATCH, STEPS = 4, 32, 8, 150
PARAMS = {"sgd": {"learning_rate": 0.1}, "dcasgd": {"learning_rate": 0.1, "lamda": 0.5}}


def problem():
    """X (2*ROWS, D), y = X @ w_true + b_true exactly (float64)."""
    gen = torch.Generator().manual_seed(7)
    X = torch.randn(2 * ROWS, D, generator=gen, dtype=torch.float64)
    w_true = torch.randn(D, generator=gen, dtype=torch.float64)
    return X, X @ w_true + 0.5


def shard(rank, world):
    X, y = problem()
    n = X.shape[0] // (world - 1)
    rows = slice((rank - 1) * n, rank * n)
    return X[rows].float(), y[rows].float()


def train(rank, world, init_method, opt_name, mode, timeout=20.0):
    X, y = shard(rank, world)
    params = {"fc.bias": torch.nn.Parameter(torch.zeros(1)), "fc.weight": torch.nn.Parameter(torch.zeros(1, D))}
    # a different start on each worker: the first registration must win
    with torch.no_grad():
        params["fc.weight"].fill_(float(rank))
    kv = trainer = None
    if mode == "trainer":
        trainer = optzoo.Trainer(params, opt_name, PARAMS[opt_name], kvstore="dist_async")
    else:
        kv = DistAsync(timeout=timeout, rank=rank, world_size=world, init_method=init_method)
        kv.set_optimizer(optzoo.create(opt_name, **PARAMS[opt_name]))
        kv.init(list(params), list(params.values()))
    w, b = params["fc.weight"], params["fc.bias"]
    for step in range(STEPS):
        rows = slice((step * BATCH) % X.shape[0], (step * BATCH) % X.shape[0] + BATCH)
        loss = 0.5 * ((X[rows] @ w[0] + b - y[rows]) ** 2).sum()
        w.grad = b.grad = None
        loss.backward()
        if trainer is not None:
            trainer.step(BATCH)
        else:
            kv.pushpull([0, 1], [b, w], 1.0 / BATCH)
    store = kv if kv is not None else trainer.kvstore
    out = {"w": w.detach().clone(), "b": b.detach().clone(), "pushes_sent": store.pushes_sent}
    if trainer is not None:  # the server's optimizer states, through the Trainer
        trainer.save_states(os.path.join(os.environ["OUTDIR"], f"trainer{rank}.states"))
        return out  # the store closes itself at exit
    store.close()
    return out


def role(rank, world, init_method, outdir, opt_name, mode):
    if rank == 0:
        try:
            if mode == "trainer":  # torchrun's environment: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
                stats = run_server(timeout=30)
            else:
                stats = run_server(timeout=3 if mode == "killworker" else 30, rank=0, world_size=world,
                                   init_method=init_method)
        except Exception as exc:  # the test checks type, message and time
            stats = {"error": f"{type(exc).__name__}: {exc}", "ranks": list(getattr(exc, "ranks", [])),
                     "at": time.time()}
        with open(os.path.join(outdir, "server.json"), "w") as f:
            json.dump(stats, f)
        return
    if mode in ("noserver", "killserver", "killworker"):
        start = time.monotonic()
        try:
            kv = DistAsync(timeout=1.5 if mode == "noserver" else 3, rank=rank, world_size=world,
                           init_method=init_method)
            kv.set_optimizer(optzoo.create(opt_name))
            w = torch.nn.Parameter(torch.zeros(3))
            kv.init(["w"], [w])
            open(os.path.join(outdir, f"ready{rank}"), "w").close()
            while True:  # until the test kills a process
                w.grad = torch.ones(3)
                start = time.monotonic()
                kv.pushpull([0], [w], 1.0)
        except Exception as exc:  # the test checks type, message and time
            err = f"{type(exc).__name__}: {exc}"
        torch.save({"error": err, "seconds": time.monotonic() - start, "at": time.time()},
                   os.path.join(outdir, f"worker{rank}.pt"))
        os._exit(0)  # the rpc join thread may still be blocked
    torch.save(train(rank, world, init_method, opt_name, mode), os.path.join(outdir, f"worker{rank}.pt"))


def _child(rank, init_method, outdir, opt_name, mode):
    os.environ["RANK"] = str(rank)
    role(rank, 3, init_method, outdir, opt_name, mode)


def main():
    """Import torch once, then fork one process per rank (3 fresh interpreters cost seconds on 2 cores).

    Writes OUTDIR/pids.json (rank -> pid) so the test can kill a rank; exits non-zero if a rank failed.
    """
    init_method, outdir, opt_name, mode, ranks = sys.argv[1:6]
    ranks = [int(r) for r in ranks.split(",")]
    pids = {}
    for rank in ranks:
        pids[rank] = dist_common.fork(_child, rank, init_method, outdir, opt_name, mode)
    with open(os.path.join(outdir, "pids.json"), "w") as f:
        json.dump(pids, f)
    failed = []
    for rank, pid in pids.items():
        _, status = os.waitpid(pid, 0)
        if status != 0:
            failed.append((rank, status))
    if failed:
        print(f"ranks failed (rank, wait status): {failed}", flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
