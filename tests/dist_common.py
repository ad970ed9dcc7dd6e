"""Launch a few real worker processes for the distributed tests (gloo on 127.0.0.1).

``run(target, nprocs, args=(), timeout=60)`` starts ``nprocs`` spawned processes; each joins a gloo process
group (rendezvous through a TCPStore hosted by *this* process, so any worker may die) and calls
``target(rank, nprocs, *args)`` (a module-level function of an importable module). It returns one entry per
rank: the target's return value (anything ``torch.save`` takes), a :class:`Failed` when it raised, or None
when the process died or was killed at ``timeout`` seconds (the whole call never takes longer).
With ``store_on_rank0=True`` the workers meet through ``env://`` instead: rank 0 hosts the store, as in a job
launched without torchrun. ``kill_me()`` SIGKILLs the calling worker, ``freeze_me()`` SIGSTOPs it (fault tests).
"""
import atexit
import datetime
import os
import signal
import socket
import sys
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


class Failed:
    """A worker's exception: its class name, message, ``ranks`` attribute (if any) and the seconds between
    the start of the step that raised (``mark()``) and the raise."""

    def __init__(self, exc, elapsed):
        self.type = type(exc).__name__
        self.mro = [c.__name__ for c in type(exc).__mro__]
        self.message = str(exc)
        self.ranks = tuple(getattr(exc, "ranks", ()))
        self.elapsed = elapsed
        self.traceback = traceback.format_exc()

    def __repr__(self):
        return f"Failed({self.type}: {self.message!r} after {self.elapsed:.1f} s)"


_MARK = [None]


def mark():
    """Note the time (a worker's fault tests measure how long the failure took from here)."""
    _MARK[0] = time.monotonic()


def kill_me():
    os.kill(os.getpid(), signal.SIGKILL)


def freeze_me():
    """A hung machine: the process stops and keeps its sockets open (the launcher kills it at the end)."""
    os.kill(os.getpid(), signal.SIGSTOP)


def _entry(target, rank, world, port, outdir, args, env, store_on_rank0=False):
    os.environ.update(env)
    torch.set_num_threads(1)
    if store_on_rank0:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=30))
    else:
        store = dist.TCPStore("127.0.0.1", port, world, is_master=False, timeout=datetime.timedelta(seconds=30))
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=30))
    try:
        result = target(rank, world, *args)
    except Exception as exc:
        start = _MARK[0]
        result = Failed(exc, time.monotonic() - start if start is not None else float("nan"))
    torch.save(result, os.path.join(outdir, f"{rank}.pt"))
    if isinstance(result, Failed):
        os._exit(0)  # tearing down a broken process group can block for seconds
    dist.destroy_process_group()


def run(target, nprocs, args=(), timeout=60, env=None, wait_for=None, store_on_rank0=False):
    """See the module docstring; ``wait_for``: the ranks to wait for (the others are killed once these are
    done; default all)."""
    ctx = mp.get_context("spawn")
    master = None
    if store_on_rank0:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    else:
        master = dist.TCPStore("127.0.0.1", 0, nprocs, is_master=True, wait_for_workers=False,
                               timeout=datetime.timedelta(seconds=30))
        port = master.port
    with tempfile.TemporaryDirectory() as outdir:
        procs = [ctx.Process(target=_entry, args=(target, r, nprocs, port, outdir, tuple(args), dict(env or {}),
                                                  store_on_rank0), daemon=True) for r in range(nprocs)]
        try:
            for p in procs:
                p.start()
            deadline = time.monotonic() + timeout
            for r, p in enumerate(procs):
                if wait_for is None or r in wait_for:
                    p.join(max(0.0, deadline - time.monotonic()))
        finally:  # SIGKILL ends stopped (frozen) processes too
            for p in procs:
                if p.pid is not None and p.is_alive():
                    p.kill()
                    p.join(5)
        out = []
        for r in range(nprocs):
            path = os.path.join(outdir, f"{r}.pt")
            out.append(torch.load(path, weights_only=False) if os.path.exists(path) else None)
    del master
    return out


def fork(fn, *args):
    """``fn(*args)`` in a forked child process; its pid. The child exits 0, or 1 with the traceback printed
    (``os._exit`` skips atexit functions, so they run first: the Trainer's store closes there)."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            fn(*args)
            atexit._run_exitfuncs()
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return pid


def loopback(server, rank=0):
    """A DistAsync worker whose rpc is a direct call into ``server`` (no processes)."""
    from optzoo.kvstore import dist_async, ps
    kv = dist_async.DistAsync.__new__(dist_async.DistAsync)
    kv.timeout, kv.rank, kv.num_workers = 5.0, rank, server.num_workers
    kv.pushes_sent = kv.bytes_sent = 0
    kv._names, kv._optimizer, kv._open, kv._joined = None, None, True, False
    kv._send = lambda method, args: ps._answer(server, method, kv.rank, args)
    return kv
