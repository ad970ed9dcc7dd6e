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

Row-sparse gradients (``torch.sparse_coo``, ``sparse_dim == 1`` over a dense weight's rows, as
``nn.Embedding(sparse=True)`` gives) travel as rows: the worker pushes the coalesced row ids and rows it
touched; the server applies the optimizer's sparse rule (lazy where the optimizer is lazy: only those rows of
the weight and of its state change; standard: the dense rule on the densified gradient, every row) and
returns **those rows only** of the new weight, which the worker writes into its parameter. Rows the worker
did not touch are not pulled: they keep the values it last pulled, stale wherever another worker's push or a
standard (non-lazy) update moved them on the server since; :meth:`DistAsync.row_sparse_pull` pulls chosen
rows (e.g. the rows the next batch looks up, as MXNet's ``row_sparse_pull``) and :meth:`DistAsync.pull`
whole weights. A row-sparse gradient the server's optimizer refuses (its ``sparse_mode``: AdaGrad with weight
decay, as MXNet's; a custom optimizer without a sparse rule) is refused, naming the parameter, before anything
changes. DCASGD (standard: every row) compensates against the rows the worker holds (see :mod:`.ps`).

Transport: TensorPipe RPC (TCP). Every call has a timeout; a server that is gone or silent raises
:class:`DistributedError` naming rank 0 instead of hanging.
"""
from __future__ import annotations

import atexit
import time
import warnings

import torch

from .. import _io
from ..optimizer.updater import dump_optimizer
from . import ps
from ._group import timeout_seconds
from ._rows import local_rows
from ._rpc import _connect, _env_int, _resolve_ranks
from .base import DistributedError, KVStore
from .ps import _CLOSE_GRACE, _ERRORS, _STATES_FORMAT, SERVER, ParameterServer, _serve_call, _worker_name

__all__ = ["DistAsync", "run_server", "DistributedError", "ParameterServer"]


def run_server(*, timeout=None, rank=None, world_size=None, init_method=None) -> dict:
    """Serve on rank 0 until every worker has closed; returns the counters.

    ``timeout`` (seconds, default ``OPTZOO_DIST_TIMEOUT`` or 300): joining, and the longest silence of a
    worker that has not closed; past it a :class:`DistributedError` names the silent workers. The result:
    ``{'pushes_received': n, 'updates_applied': n, 'workers': {worker_rank: {...}}}`` (worker rank = process
    rank - 1).
    """
    import torch.distributed.rpc as rpc

    timeout = timeout_seconds(timeout)
    rank, world_size = _resolve_ranks(0 if rank is None and _env_int("RANK") is None else rank, world_size)
    if rank != 0:
        raise ValueError(f"run_server() runs on rank 0; this process is rank {rank} (a worker: use a Trainer "
                         "with kvstore='dist_async')")
    server = ps._SERVER = ParameterServer(world_size - 1)
    _connect(SERVER, 0, world_size, init_method, timeout)
    try:
        silent = server.wait_closed(timeout)
        if not silent:
            # every worker has its answer to close(): nothing is outstanding (a graceful shutdown would
            # make early workers wait for the last one); the pause lets the last answer leave
            time.sleep(_CLOSE_GRACE)
    finally:
        rpc.shutdown(graceful=False)
        ps._SERVER = None
    if silent:
        ranks = [w + 1 for w in silent]
        raise DistributedError(f"dist_async server (rank 0): worker process rank(s) {ranks} sent nothing for "
                               f"{timeout:g} s without closing: they died or hang (the timeout must exceed the longest "
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
    Counters: ``pushes_sent`` and ``bytes_sent`` (gradient payload: ``n * element_size`` for a dense gradient
    of ``n`` elements; ``(8 + row_bytes) * k`` for a row-sparse one touching ``k`` distinct rows, int64 ids
    and rows) here, the server's via :meth:`server_stats`.
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
                                   f"answer {method} within {self.timeout:g} s: it died or hangs "
                                   f"({type(exc).__name__}: {exc})", [0]) from None
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
        """Pull the server's whole weights of ``indices`` into ``params`` in place."""
        _copy_into(params, self._call("pull", self._keys(indices)))

    def row_sparse_pull(self, indices, params, row_ids):
        """Pull only the rows ``row_ids[k]`` (1-D integer tensors) of the server's weights into ``params[k]``
        in place (MXNet's ``row_sparse_pull``): e.g. the rows the next batch looks up."""
        names = self._keys(indices)
        rows = []
        for n, p, r in zip(names, params, row_ids):
            r = torch.as_tensor(r).detach().reshape(-1).to("cpu", torch.int64)
            if p.dim() < 1 or (r.numel() and not (0 <= int(r.min()) and int(r.max()) < p.shape[0])):
                raise ValueError(f"row_sparse_pull: rows of {n!r} must lie in [0, {p.shape[0] if p.dim() else 0})")
            rows.append(r)
        _copy_into(params, self._call("pull_rows", names, rows), rows)

    def allreduce_grads(self, indices, params):
        raise NotImplementedError("dist_async updates on the kvstore (server): use pushpull, not allreduce_grads")

    def pushpull(self, indices, params, rescale_grad):
        """Push ``p.grad`` of each param (scaled by ``rescale_grad`` on the server); the server applies one
        update; the new weights are pulled into ``params`` in place."""
        names = self._keys(indices)
        missing = [n for n, p in zip(names, params) if p.grad is None]
        if missing:
            raise ValueError(f"dist_async pushpull: parameters {missing} have no gradient (.grad is None)")
        grads, rows = [], []
        for n, p in zip(names, params):
            g = p.grad.detach()
            if g.layout is torch.strided:
                grads.append(g.cpu().clone())
                rows.append(None)
                continue
            ids, values = local_rows(p, n)  # only the touched rows travel (checked before anything is sent)
            ids, values = ids.cpu().clone(), values.cpu().clone()
            grads.append(("rows", ids, values))
            rows.append(ids)
        lr, mults = None, None
        opt = self._optimizer
        if opt is not None:
            lr = opt.lr if opt.lr_scheduler is None else None
            mults = [_mults_of(opt, i) for i in indices]
        self.pushes_sent += 1
        self.bytes_sent += sum(g[1].numel() * 8 + g[2].numel() * g[2].element_size() if isinstance(g, tuple)
                               else g.numel() * g.element_size() for g in grads)
        _copy_into(params, self._call("push", names, grads, float(rescale_grad), lr, mults), rows)

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


def _copy_into(params, values, rows=None):
    """Write pulled weights into ``params`` in place; where ``rows[k]`` is given, ``values[k]`` holds only
    those rows."""
    with torch.no_grad():
        for k, (p, v) in enumerate(zip(params, values)):
            r = None if rows is None else rows[k]
            if r is None:
                p.detach().copy_(v)
            elif r.numel():
                p.detach().index_copy_(0, r.to(p.device), v.to(p.device, p.dtype))
