"""The dist_async parameter server's state and update rule (rank 0), without transport.

:class:`ParameterServer` holds the weights and one :class:`~optzoo.optimizer.Updater`; every push is one
update, under a lock, in arrival order. For DCASGD it keeps the weights each worker last pulled (see
:mod:`optzoo.kvstore.dist_async`). :func:`_serve_call` is what a worker's rpc runs on rank 0.
"""
from __future__ import annotations

import threading
import time

import torch

from ..optimizer.dcasgd import DCASGD
from ..optimizer.updater import Updater, dump_optimizer, load_optimizer

__all__ = ["ParameterServer"]

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

    def _pulled(self, worker, names, rows=None):
        """The weights of ``names`` for ``worker`` (only the rows ``rows[k]`` where given and not None)."""
        rows = rows or [None] * len(names)
        out = [self.weights[n].clone() if r is None else self.weights[n].index_select(0, r)
               for n, r in zip(names, rows)]
        if self._keeps_backups():  # what the worker now holds: only the pulled rows are new where rows are given
            for n, r in zip(names, rows):
                bak = self.backups.get((worker, n))
                if r is None or bak is None:
                    self.backups[(worker, n)] = self._master(n).clone()
                elif r.numel():
                    bak.index_copy_(0, r, self._master(n).index_select(0, r))
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

    def pull_rows(self, worker, names, rows):
        """The rows ``rows[k]`` (int64) of each weight ``names[k]`` (``DistAsync.row_sparse_pull``)."""
        self._seen(worker)
        with self.lock:
            self._check_names(names)
            for n, r in zip(names, rows):
                self._check_rows(worker, n, r)
            return self._pulled(worker, names, list(rows))

    def _check_rows(self, worker, name, ids, values=None):
        w = self.weights[name]
        if not (isinstance(ids, torch.Tensor) and ids.dim() == 1 and ids.dtype == torch.int64) or w.dim() < 1:
            raise ValueError(f"{_who(worker)}: the row ids of {name!r} must be a 1-D int64 tensor over the rows of "
                             f"its weight of shape {tuple(w.shape)}")
        if ids.numel() and not (0 <= int(ids.min()) and int(ids.max()) < w.shape[0]):
            raise ValueError(f"{_who(worker)}: row ids of {name!r} outside [0, {w.shape[0]})")
        if values is not None and (not isinstance(values, torch.Tensor)
                                   or tuple(values.shape) != (ids.numel(), *w.shape[1:])):
            raise ValueError(f"{_who(worker)}: the rows of {name!r} have shape "
                             f"{tuple(getattr(values, 'shape', ()))}: expected {(ids.numel(), *w.shape[1:])}")

    def push(self, worker, names, grads, rescale_grad, lr=None, mults=None):
        """Apply one optimizer update with ``worker``'s gradients, then return the new weights (its pull).

        ``lr`` (the worker's base learning rate, when it has no scheduler) and ``mults`` (per name
        ``(lr_mult, wd_mult)``) travel with the push so that the worker's settings stay live.

        A gradient is a dense tensor of the weight's shape, or ``('rows', ids, rows)`` for a row-sparse one
        (int64 row ids, their rows): the optimizer's sparse rule applies, and only those rows of the new
        weight come back.
        """
        self._seen(worker)
        with self.lock:
            self.stats[worker]["pushes_received"] += 1
            if self.updater is None:
                raise ValueError("push before set_optimizer: the server has no optimizer")
            self._check_names(names)
            rows = [None] * len(names)
            for k, (n, g) in enumerate(zip(names, grads)):
                w = self.weights[n]
                if isinstance(g, tuple):  # ('rows', ids, values): a row-sparse gradient's touched rows
                    if len(g) != 3 or g[0] != "rows":
                        raise ValueError(f"{_who(worker)}: gradient of {n!r} is a malformed row-sparse push")
                    self._check_rows(worker, n, g[1], g[2])
                    rows[k] = g[1]
                elif g.shape != w.shape:
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
            for n, i, w, r in zip(names, indices, weights, rows):  # refused before anything changes
                if r is not None and opt.sparse_mode(i, bool(opt._mp(w))) not in ("lazy", "standard"):
                    raise TypeError(f"{_who(worker)} pushed a row-sparse gradient of {n!r}: "
                                    f"{type(opt).__name__} does not support row-sparse gradients; use a dense "
                                    "gradient (nn.Embedding(sparse=False)) for it")
            grads = [g.to(w.dtype) if r is None else
                     torch.sparse_coo_tensor(g[1].unsqueeze(0), g[2].to(w.dtype), w.shape, check_invariants=False)
                     for g, w, r in zip(grads, weights, rows)]
            if isinstance(opt, DCASGD):
                self._compensate_against(worker, names, indices, weights)
            self.updater(indices, grads, weights)
            self.stats[worker]["updates_applied"] += 1
            return self._pulled(worker, names, rows)

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
