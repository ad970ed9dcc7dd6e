r"""``kvstore='dist_async'``: an asynchronous parameter server on ``torch.distributed.rpc``.

Process rank 0 is the server (:func:`run_server`); ranks 1..N are workers (:class:`DistAsync`, which the
:class:`~optzoo.Trainer` creates for ``kvstore='dist_async'``). As in MXNet, the optimizer runs on the server
and updates are applied **on arrival**: a worker pushes its gradients, the server applies one optimizer
update to its copy of the weights under a lock (one update per push, in arrival order, no waiting for
the other workers), and the worker pulls the new weights back. Workers never wait for each other.

DCASGD (Zheng et al., 2017) compensates the staleness of worker :math:`m`'s gradient with the weights
:math:`w_{bak}(m)` that worker :math:`m` last pulled (the server keeps one backup per worker):

.. math::
    w \leftarrow w - lr\,\big(G + wd\cdot w + \lambda\,G^2\,(w - w_{bak}(m))\big)

MXNet's own server keeps one ``w_prev`` per key (the weight before the last update, whoever pushed it):
that is the single-process DCASGD, and the per-worker rule gives the same numbers when two workers push in
strict alternation. A worker that pulls right after its own push and nobody else pushed in between has
:math:`w = w_{bak}(m)`: no delay, no compensation. Other optimizers run unchanged on the server.

Transport: TensorPipe RPC (TCP). Every call has a timeout; a server that is gone or silent raises
:class:`DistributedError` naming rank 0 instead of hanging.
"""
from __future__ import annotations

import atexit
import os
import threading
import time
import warnings

import torch

from .. import _io
from ..optimizer.dcasgd import DCASGD
from ..optimizer.updater import Updater, dump_optimizer, load_optimizer
from ._group import timeout_seconds
from .base import DistributedError, KVStore

__all__ = ["DistAsync", "run_server", "DistributedError"]

SERVER = "optzoo-ps"          # rpc name of rank 0
_CLOSE_GRACE = 0.5            # seconds the server lingers after the last close()
_STATES_FORMAT = "optzoo.dist_async_states/1"
_ERRORS = {"ValueError": ValueError, "TypeError": TypeError, "KeyError": KeyError,
           "NotImplementedError": NotImplementedError}


def _worker_name(rank):
    return f"optzoo-worker{rank}"


def _who(worker):
    return f"worker {worker} (process rank {worker + 1})"


# ============================================================================================ server
class _Mults:
    """``param_dict`` entry: the multipliers a worker sent with its push."""

    __slots__ = ("lr_mult", "wd_mult")

    def __init__(self, lr_mult, wd_mult):
        self.lr_mult, self.wd_mult = lr_mult, wd_mult


class ParameterServer:
    """The server's state and its update rule; thread-safe (one lock), transport-free (testable in-process).

    Keys are parameter names; the first worker's ``init`` fixes the names (their order is the optimizer's
    index), shapes, dtypes and values. ``backups[(worker, name)]`` is the weight that worker last pulled
    (its fp32 master copy under multi-precision), kept only for DCASGD.
    """

    def __init__(self, num_workers):
        self.num_workers = num_workers
        self.lock = threading.Lock()
        self.names, self.index, self.weights = [], {}, {}
        self.updater = None
        self.backups = {}
        self.stats = {w: {"pushes_received": 0, "updates_applied": 0, "pulls": 0} for w in range(num_workers)}
        self.closed, self.last_seen = set(), {}
        self.changed = threading.Condition()

    # ---------------------------------------------------------------- bookkeeping
    def _seen(self, worker, closing=False):
        with self.changed:
            self.last_seen[worker] = time.monotonic()
            if closing:
                self.closed.add(worker)
            self.changed.notify_all()

    def wait_closed(self, timeout):
        """Block until every worker has closed (returns []) or some sent nothing for ``timeout`` seconds
        (returns those workers)."""
        start = time.monotonic()
        with self.changed:
            while len(self.closed) < self.num_workers:
                now = time.monotonic()
                silent = [w for w in range(self.num_workers) if w not in self.closed
                          and now - self.last_seen.get(w, start) > timeout]
                if silent:
                    return silent
                self.changed.wait(timeout=min(1.0, timeout))
        return []

    @property
    def optimizer(self):
        return None if self.updater is None else self.updater.optimizer

    def _keeps_backups(self):
        return self.updater is None or isinstance(self.optimizer, DCASGD)

    def _master(self, name):
        """The server's truth for ``name``: the fp32 master copy under multi-precision, else the weight."""
        w = self.weights[name]
        opt, i = self.optimizer, self.index[name]
        if opt is not None and opt._mp(w) and i in self.updater.states:
            return opt._split_mp(self.updater.states[i])[0]
        return w

    def _pulled(self, worker, names):
        out = [self.weights[n].clone() for n in names]
        if self._keeps_backups():
            for n in names:
                self.backups[(worker, n)] = self._master(n).clone()
        self.stats[worker]["pulls"] += 1
        return out

    def _check_names(self, names):
        unknown = [n for n in names if n not in self.index]
        if unknown:
            raise KeyError(f"parameters {unknown} were never registered with init(): the server knows "
                           f"{self.names}")

    # ---------------------------------------------------------------- the calls
    def set_optimizer(self, worker, blob):
        """The first optimizer wins; a worker sending a different one gets a ValueError."""
        self._seen(worker)
        with self.lock:
            if self.updater is None:
                self.updater = Updater(load_optimizer(blob))
                if not self._keeps_backups():
                    self.backups.clear()
                return
            mine = dump_optimizer(self.optimizer)
            if (blob["name"], blob["args"], blob["kwargs"]) != (mine["name"], mine["args"], mine["kwargs"]):
                raise ValueError(f"{_who(worker)} sent optimizer {blob['name']}({blob['kwargs']}) but the server "
                                 f"already runs {mine['name']}({mine['kwargs']}): every worker must use the same "
                                 "optimizer")

    def init(self, worker, names, values):
        """Register the weights (the first worker's values win) and return the server's values."""
        self._seen(worker)
        with self.lock:
            if not self.names:
                if len(set(names)) != len(names):
                    raise ValueError(f"names {names} repeat a name: expected unique parameter names")
                self.names = list(names)
                self.index = {n: i for i, n in enumerate(names)}
                self.weights = {n: v.detach().clone() for n, v in zip(names, values)}
            elif list(names) != self.names:
                raise ValueError(f"{_who(worker)} registered parameters {list(names)} but the server holds "
                                 f"{self.names}: every worker must pass the same names in the same order")
            for n, v in zip(names, values):
                w = self.weights[n]
                if v.shape != w.shape or v.dtype != w.dtype:
                    raise ValueError(f"{_who(worker)}: parameter {n!r} has shape {tuple(v.shape)} and dtype "
                                     f"{v.dtype}; the server holds {tuple(w.shape)} and {w.dtype}")
            return self._pulled(worker, names)

    def pull(self, worker, names):
        self._seen(worker)
        with self.lock:
            self._check_names(names)
            return self._pulled(worker, names)

    def push(self, worker, names, grads, rescale_grad, lr=None, mults=None):
        """Apply one optimizer update with ``worker``'s gradients, then return the new weights (its pull).

        ``lr`` (the worker's base learning rate, when it has no scheduler) and ``mults`` (per name
        ``(lr_mult, wd_mult)``) travel with the push so that the worker's settings stay live.
        """
        self._seen(worker)
        with self.lock:
            self.stats[worker]["pushes_received"] += 1
            if self.updater is None:
                raise ValueError("push before set_optimizer: the server has no optimizer")
            self._check_names(names)
            for n, g in zip(names, grads):
                w = self.weights[n]
                if g.shape != w.shape:
                    raise ValueError(f"{_who(worker)}: gradient of {n!r} has shape {tuple(g.shape)}: expected "
                                     f"{tuple(w.shape)}")
            opt = self.optimizer
            opt.rescale_grad = rescale_grad
            if lr is not None and opt.lr_scheduler is None:
                opt.lr = lr
            if mults is not None:
                opt.param_dict = {self.index[n]: _Mults(*m) for n, m in zip(names, mults) if m is not None}
            indices = [self.index[n] for n in names]
            weights = [self.weights[n] for n in names]
            if isinstance(opt, DCASGD):
                self._compensate_against(worker, names, indices, weights)
            self.updater(indices, [g.to(w.dtype) for g, w in zip(grads, weights)], weights)
            self.stats[worker]["updates_applied"] += 1
            return self._pulled(worker, names)

    def _compensate_against(self, worker, names, indices, weights):
        """DCASGD: make ``w_prev`` of each state the weight this worker last pulled (its backup)."""
        opt, states = self.optimizer, self.updater.states
        for n, i, w in zip(names, indices, weights):
            if i not in states:
                states[i] = opt.create_state_multi_precision(i, w)
                self.updater.states_synced[i] = True
            inner = opt._split_mp(states[i])[1] if opt._mp(w) else states[i]
            inner[1].copy_(self.backups[(worker, n)])  # state (mom, w_prev)

    def get_states(self, worker):
        """``(names, Updater.get_states bytes with the optimizer)``; None without an optimizer."""
        self._seen(worker)
        with self.lock:
            return None if self.updater is None else (self.names, self.updater.get_states(dump_optimizer=True))

    def set_states(self, worker, names, data):
        self._seen(worker)
        with self.lock:
            if self.updater is None:
                raise ValueError("load_optimizer_states before set_optimizer: the server has no optimizer")
            if list(names) != self.names:
                raise ValueError(f"the states are for parameters {list(names)}: the server holds {self.names} "
                                 "(the same names in the same order are needed)")
            updater = Updater(self.optimizer)
            updater.set_states(data)
            if type(updater.optimizer) is not type(self.optimizer):
                raise ValueError(f"the states are for {type(updater.optimizer).__name__}: the server runs "
                                 f"{type(self.optimizer).__name__}")
            self.updater = updater

    def summary(self):
        with self.lock:
            per = {w: dict(s) for w, s in self.stats.items()}
        return {"pushes_received": sum(s["pushes_received"] for s in per.values()),
                "updates_applied": sum(s["updates_applied"] for s in per.values()),
                "workers": per}


_SERVER: ParameterServer | None = None


def _serve_call(method, worker, *args):
    """What a worker's rpc runs on rank 0."""
    return _answer(_SERVER, method, worker, args)


def _answer(server, method, worker, args):
    """``server``'s answer to one call; errors come back as data (re-raised with their type)."""
    try:
        if server is None:
            raise RuntimeError("this process is not running optzoo.kvstore.run_server()")
        if method == "close":
            server._seen(worker, closing=True)
            return ("ok", None)
        if method == "summary":
            return ("ok", server.summary())
        return ("ok", getattr(server, method)(worker, *args))
    except Exception as exc:  # noqa: BLE001 - sent back to the worker
        return ("err", type(exc).__name__, str(exc))


# ============================================================================================ connection
def _env_int(name):
    value = os.environ.get(name)
    return int(value) if value is not None else None


def _connect(name, rank, world_size, init_method, timeout):
    """Join the rpc group, giving up after ``timeout`` seconds with a DistributedError."""
    import torch.distributed as dist
    import torch.distributed.rpc as rpc

    if init_method is None:
        if dist.is_initialized() and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
            # a process group made on env:// holds MASTER_PORT: rank 0 picks another port for rpc
            port = [_free_port() if dist.get_rank() == 0 else None]
            dist.broadcast_object_list(port, src=0)
            init_method = f"tcp://{os.environ.get('MASTER_ADDR', '127.0.0.1')}:{port[0]}"
        else:
            init_method = "env://"
    opts = rpc.TensorPipeRpcBackendOptions(init_method=init_method, rpc_timeout=timeout, num_worker_threads=8)
    errors = []

    def join():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # torch's own deprecation note on its gloo group
                rpc.init_rpc(name, rank=rank, world_size=world_size, rpc_backend_options=opts)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    thread = threading.Thread(target=join, name="optzoo-rpc-join", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive() or errors:
        why = f"{type(errors[0]).__name__}: {errors[0]}" if errors else f"nothing within {timeout:g} s"
        if rank == 0:
            who = f"the dist_async workers (ranks 1..{world_size - 1}) did not all join"
        else:
            who = ("could not reach the dist_async parameter server (rank 0); is optzoo.kvstore.run_server() "
                   "running there?")
        raise DistributedError(f"rank {rank}: {who} ({init_method}, world_size {world_size}): {why}",
                               [] if rank == 0 else [0])


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _resolve_ranks(rank, world_size):
    rank = _env_int("RANK") if rank is None else rank
    world_size = _env_int("WORLD_SIZE") if world_size is None else world_size
    if rank is None or world_size is None:
        raise ValueError("dist_async needs rank and world_size: run under torchrun (RANK, WORLD_SIZE, MASTER_ADDR, "
                         "MASTER_PORT) or pass rank=, world_size= and init_method=")
    if world_size < 2 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank}, world_size={world_size} is invalid: expected world_size >= 2 (rank 0 "
                         "serves, ranks 1.. work) and 0 <= rank < world_size")
    return rank, world_size


def run_server(*, timeout=None, rank=None, world_size=None, init_method=None) -> dict:
    """Serve on rank 0 until every worker has closed; returns the counters.

    ``timeout`` (seconds, default ``OPTZOO_DIST_TIMEOUT`` or 300): joining, and the longest silence of a
    worker that has not closed; past it a :class:`DistributedError` names the silent workers. The result:
    ``{'pushes_received': n, 'updates_applied': n, 'workers': {worker_rank: {...}}}`` (worker rank = process
    rank - 1).
    """
    import torch.distributed.rpc as rpc

    global _SERVER
    timeout = timeout_seconds(timeout)
    rank, world_size = _resolve_ranks(0 if rank is None and _env_int("RANK") is None else rank, world_size)
    if rank != 0:
        raise ValueError(f"run_server() runs on rank 0; this process is rank {rank} (a worker: use a Trainer "
                         "with kvstore='dist_async')")
    server = _SERVER = ParameterServer(world_size - 1)
    _connect(SERVER, 0, world_size, init_method, timeout)
    try:
        silent = server.wait_closed(timeout)
        if not silent:
            # every worker has its answer to close(): nothing is outstanding (a graceful shutdown would
            # make early workers wait for the last one); the pause lets the last answer leave
            time.sleep(_CLOSE_GRACE)
    finally:
        rpc.shutdown(graceful=False)
        _SERVER = None
    if silent:
        ranks = [w + 1 for w in silent]
        raise DistributedError(f"dist_async server (rank 0): worker process rank(s) {ranks} sent nothing for "
                               f"{timeout:g} s without closing: dead or hung (the timeout must exceed the longest "
                               "gap between a worker's pushes)", ranks)
    return server.summary()


# ============================================================================================ worker
class DistAsync(KVStore):
    """The worker side of ``kvstore='dist_async'`` (process ranks 1..N; rank 0 runs :func:`run_server`).

    Parameters
    ----------
    timeout : float, optional
        Seconds for joining and for every call to the server (default ``OPTZOO_DIST_TIMEOUT`` or 300).
    rank, world_size : int, optional
        This process's rank and the number of processes including the server; default ``RANK`` /
        ``WORLD_SIZE`` from the environment (torchrun).
    init_method : str, optional
        Rendezvous URL (``tcp://host:port``); default ``env://`` (``MASTER_ADDR``/``MASTER_PORT``).

    ``rank`` is the worker rank (process rank - 1) and ``num_workers`` the number of workers, as MXNet's.
    Counters: ``pushes_sent`` and ``bytes_sent`` (gradient payload) here, the server's via :meth:`server_stats`.
    """

    type = "dist_async"
    update_on_kvstore = True

    def __init__(self, *, timeout=None, rank=None, world_size=None, init_method=None):
        self.timeout = timeout_seconds(timeout)
        process_rank, world_size = _resolve_ranks(rank, world_size)
        if process_rank == 0:
            raise ValueError("rank 0 is the dist_async parameter server: call optzoo.kvstore.run_server() there, "
                             "and create the Trainer (kvstore='dist_async') on ranks 1..N")
        self.rank, self.num_workers = process_rank - 1, world_size - 1
        self.pushes_sent = self.bytes_sent = 0
        self._names, self._optimizer, self._open, self._joined = None, None, False, True
        _connect(_worker_name(process_rank), process_rank, world_size, init_method, self.timeout)
        self._open = True
        atexit.register(self.close)  # a worker that simply exits still tells the server it is done

    def _send(self, method, args):
        """The transport: one rpc to rank 0 (replaced by a direct call in in-process tests)."""
        import torch.distributed.rpc as rpc
        return rpc.rpc_sync(SERVER, _serve_call, args=(method, self.rank) + args, timeout=self.timeout)

    def _call(self, method, *args):
        if not self._open:
            raise RuntimeError("this dist_async kvstore is closed")
        try:
            reply = self._send(method, args)
        except Exception as exc:
            raise DistributedError(f"worker rank {self.rank + 1}: the dist_async parameter server (rank 0) did not "
                                   f"answer {method} within {self.timeout:g} s or is gone: "
                                   f"{type(exc).__name__}: {exc}", [0]) from None
        if reply[0] == "err":
            raise _ERRORS.get(reply[1], RuntimeError)(f"dist_async server (rank 0): {reply[2]}")
        return reply[1]

    def set_optimizer(self, optimizer):
        """Send the optimizer to the server as data (registered name + hyperparameters + bookkeeping).

        A custom optimizer must be registered and importable on the server too.
        """
        self._call("set_optimizer", dump_optimizer(optimizer))
        self._optimizer = optimizer

    def init(self, names, params):
        """Register the weights (the first worker's values win) and pull the server's values into ``params``.

        ``names[k]`` is index ``k`` of later calls.
        """
        self._names = list(names)
        values = self._call("init", self._names, [p.detach().cpu().clone() for p in params])
        _copy_into(params, values)

    def _keys(self, indices):
        if self._names is None:
            raise RuntimeError("dist_async: init(names, params) must come before push/pull")
        return [self._names[i] for i in indices]

    def pull(self, indices, params):
        _copy_into(params, self._call("pull", self._keys(indices)))

    def allreduce_grads(self, indices, params):
        raise NotImplementedError("dist_async updates on the kvstore (server): use pushpull, not allreduce_grads")

    def pushpull(self, indices, params, rescale_grad):
        """Push ``p.grad`` of each param (scaled by ``rescale_grad`` on the server); the server applies one
        update; the new weights are pulled into ``params`` in place."""
        names = self._keys(indices)
        missing = [n for n, p in zip(names, params) if p.grad is None]
        if missing:
            raise ValueError(f"dist_async pushpull: parameters {missing} have no gradient (.grad is None)")
        grads = [p.grad.detach().cpu().clone() for p in params]
        lr, mults = None, None
        opt = self._optimizer
        if opt is not None:
            lr = opt.lr if opt.lr_scheduler is None else None
            mults = [_mults_of(opt, i) for i in indices]
        self.pushes_sent += 1
        self.bytes_sent += sum(g.numel() * g.element_size() for g in grads)
        _copy_into(params, self._call("push", names, grads, float(rescale_grad), lr, mults))

    def server_stats(self) -> dict:
        """The server's counters (see :func:`run_server`)."""
        return self._call("summary")

    def save_optimizer_states(self, fname) -> None:
        """Write the server's optimizer and states (atomically)."""
        data = self._call("get_states")
        if data is None:
            raise ValueError("save_optimizer_states before set_optimizer: the server has no optimizer")
        names, data = data
        _io.atomic_save({"format": _STATES_FORMAT, "names": names,
                         "updater": torch.frombuffer(bytearray(data), dtype=torch.uint8)}, fname)

    def load_optimizer_states(self, fname) -> None:
        """Load ``save_optimizer_states`` output into the server (optimizer, update counts and states); the
        server's parameters must be the saved ones, in the same order."""
        blob = _io.safe_load(fname, _STATES_FORMAT, "dist_async optimizer states")
        self._call("set_states", blob["names"], blob["updater"].numpy().tobytes())

    def close(self) -> None:
        """Tell the server this worker is done, then leave the rpc group (without waiting for the others)."""
        import torch.distributed.rpc as rpc
        if not self._open:
            return
        atexit.unregister(self.close)
        try:
            self._call("close")
        except DistributedError as exc:  # the server is gone already: nothing is left to tell it
            warnings.warn(f"dist_async close(): {exc}", RuntimeWarning, stacklevel=2)
        finally:
            self._open = False
            if rpc.is_available() and self._joined:
                rpc.shutdown(graceful=False)


def _mults_of(opt, index):
    info = opt.param_dict.get(index)
    return None if info is None else (float(info.lr_mult), float(info.wd_mult))


def _copy_into(params, values):
    with torch.no_grad():
        for p, v in zip(params, values):
            p.detach().copy_(v)
