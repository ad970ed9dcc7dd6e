"""Process groups for the stores, and turning a failed collective into a :class:`DistributedError`
that names the rank(s) responsible.

Timeouts: every store runs its collectives on its own process group created with the store's timeout
(``timeout=`` argument, else the environment variable ``OPTZOO_DIST_TIMEOUT`` in seconds, else
:data:`DEFAULT_TIMEOUT`), so a worker that hangs makes the others fail after that long instead of
torch's 30 minutes; a worker that dies closes its connections and the others fail at once.

Naming the culprit: a worker whose collective fails writes ``fail/<rank>`` into the job's rendezvous
store (torchrun's, or the one ``init_process_group`` created) and waits up to :data:`GRACE` seconds (at
most the timeout) for the other workers to do the same; the ranks that never report are the ones that
died or hang. The store's host may be the one that hangs (rank 0 hosts it under ``env://`` without
torchrun): torch's TCPStore client then waits for ever in ``check``, ``get``, ``wait`` and ``add``
(its own timeout covers only the first wait for an answer, after which it blocks on the answer to its
cancellation), so the store is asked from a daemon thread on a connection of its own (``Store.clone``,
made while the job was healthy) and that thread is waited for no longer than the grace period: a store
that does not answer in time names its host as the one that died or hangs.
"""
from __future__ import annotations

import atexit
import datetime
import itertools
import os
import threading
import time

import torch.distributed as dist

from .base import DistributedError

__all__ = ["DEFAULT_TIMEOUT", "GRACE", "timeout_seconds", "ensure_default_group", "Collectives"]

#: Seconds a collective may wait for the other workers when neither ``timeout=`` nor
#: ``OPTZOO_DIST_TIMEOUT`` is given.
DEFAULT_TIMEOUT = 300.0
#: Seconds a failed worker waits for the others to report their failure too (capped by the timeout).
GRACE = 5.0
_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_counter = itertools.count()


def timeout_seconds(timeout=None) -> float:
    """The collective timeout: ``timeout``, else ``$OPTZOO_DIST_TIMEOUT``, else :data:`DEFAULT_TIMEOUT`."""
    source = "timeout"
    if timeout is None and os.environ.get("OPTZOO_DIST_TIMEOUT"):
        timeout, source = os.environ["OPTZOO_DIST_TIMEOUT"], "OPTZOO_DIST_TIMEOUT"
        try:
            timeout = float(timeout)
        except ValueError:
            raise ValueError(f"{source}={timeout!r} is invalid: expected a number of seconds > 0") from None
    if timeout is None:
        return DEFAULT_TIMEOUT
    if isinstance(timeout, datetime.timedelta):
        timeout = timeout.total_seconds()
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"{source}={timeout!r} is invalid: expected a number of seconds > 0")
    return float(timeout)


def ensure_default_group(device_type: str, timeout: float) -> bool:
    """Use the process group the user created; else create one from torchrun's environment variables
    (gloo for CPU tensors, nccl for CUDA). Returns whether it was created here."""
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this PyTorch build: distributed kvstores "
                           "need it")
    if dist.is_initialized():
        return False
    missing = [k for k in _ENV if k not in os.environ]
    if missing:
        raise RuntimeError(f"no torch.distributed process group and no {', '.join(missing)} in the environment: "
                           "launch with torchrun (python -m torch.distributed.run) or call "
                           "torch.distributed.init_process_group before creating a distributed kvstore")
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method="env://", timeout=datetime.timedelta(seconds=timeout))
    return True


class Collectives:
    """This store's own process group (all ranks, the store's timeout) and its collectives, each of
    which raises :class:`DistributedError` naming the failed ranks instead of a bare gloo/nccl error."""

    def __init__(self, kind: str, device_type: str, timeout: float):
        self.kind, self.timeout = kind, timeout
        self.created_default = ensure_default_group(device_type, timeout)
        self.rank, self.size = dist.get_rank(), dist.get_world_size()
        backend = "nccl" if device_type == "cuda" else "gloo"
        # every rank creates its stores in the same order, so this names the same store on every rank
        self.name = f"optzoo/{kind}/{next(_counter)}/"
        self.group = dist.new_group(backend=backend, timeout=datetime.timedelta(seconds=timeout))
        self.store, self.host, self.host_ranks = _fault_store(self.name, self.created_default)
        self.broken = None
        # the groups made here are destroyed before the interpreter finalizes, even when nobody calls close():
        # gloo's worker threads left to static destruction may abort the process at exit ("terminate called
        # without an active exception", SIGABRT: pytorch/pytorch#190489), seen once in a 2-worker example
        atexit.register(self._close_at_exit)

    def call(self, what, fn, *args, **kwargs):
        """``fn(*args, group=..., **kwargs)``; a failure becomes a :class:`DistributedError`."""
        if self.broken is not None:
            raise DistributedError(f"{self.kind}: the job already failed: {self.broken}", self.broken.ranks)
        try:
            return fn(*args, group=self.group, **kwargs)
        except DistributedError:
            raise
        except RuntimeError as exc:  # gloo/nccl failures (DistBackendError, timeouts) are RuntimeErrors
            self.broken = self.diagnose(exc, what)
            raise self.broken from exc

    def diagnose(self, exc, what) -> DistributedError:
        first = (str(exc).splitlines() or [""])[0]
        head = f"{self.kind}: {what} failed on rank {self.rank} of {self.size} ({type(exc).__name__}: {first})"
        tail = (f"collective timeout {self.timeout:g} s: set it with optzoo.kvstore.create(..., timeout=...) "
                "or OPTZOO_DIST_TIMEOUT")
        if self.store is None:
            return DistributedError(f"{head}; {tail}")
        grace = min(GRACE, self.timeout)
        missing, store_exc = self._reports(grace)
        if store_exc is not None:
            # a closed connection means the host is gone; anything else (a store timeout) may be a hang
            gone = isinstance(store_exc, getattr(dist, "DistNetworkError", ()))
            return DistributedError(f"{head}; the rendezvous store is unreachable too ({type(store_exc).__name__}: "
                                    f"{(str(store_exc).splitlines() or [''])[0]}): {self.host} "
                                    f"{'died' if gone else 'died or hangs'}; {tail}", self.host_ranks)
        if missing is None:
            return DistributedError(f"{head}; the rendezvous store did not answer within {grace:g} s: {self.host} "
                                    f"died or hangs; {tail}", self.host_ranks)
        if not missing:
            return DistributedError(f"{head}; every other rank failed too, none is missing; {tail}")
        who = ", ".join(map(str, missing))
        return DistributedError(f"{head}; rank{'s' if len(missing) > 1 else ''} {who} did not report within "
                                f"{grace:g} s: {'they' if len(missing) > 1 else 'it'} died or hang"
                                f"{'' if len(missing) > 1 else 's'}; {tail}", missing)

    def _reports(self, grace):
        """Report this rank's failure and collect the others' for ``grace`` seconds: ``(missing ranks,
        None)``, ``(None, the store's error)``, or ``(None, None)`` when the store answered nothing in time.

        The store is asked from a daemon thread that is waited for ``grace`` seconds at most (see the
        module docstring); a thread stuck on a frozen host stays blocked on its own connection, which
        nothing else uses."""
        store, rank, others = self.store, self.rank, [r for r in range(self.size) if r != self.rank]
        deadline = time.monotonic() + grace
        answer = {}

        def ask():
            try:
                store.set(f"fail/{rank}", "1")
                while True:
                    answer["missing"] = missing = [r for r in others if not store.check([f"fail/{r}"])]
                    if not missing or time.monotonic() > deadline:
                        return
                    time.sleep(0.05)
            except Exception as store_exc:  # noqa: BLE001 - reported by diagnose
                answer["error"] = store_exc

        thread = threading.Thread(target=ask, name="optzoo-fault-report", daemon=True)
        thread.start()
        thread.join(grace)
        # the last full round of answers (at most one poll old when the thread is still in a round)
        return answer.get("missing"), answer.get("error")

    def close(self):
        atexit.unregister(self._close_at_exit)
        if dist.is_initialized():
            dist.destroy_process_group(self.group)
            if self.created_default:
                dist.destroy_process_group()

    def _close_at_exit(self):
        if self.broken is None:  # a failed job's groups are left as they are (a peer may be gone or hang)
            try:
                self.close()
            except Exception:  # noqa: BLE001 - at exit, after the user's own teardown: nothing left to tell
                pass


def _fault_store(name, created_default):
    """``(store, host, host_ranks)``: the job's rendezvous store under this store's prefix, on a connection
    of its own when the store can be cloned (None when there is none), and who hosts it (for messages)."""
    try:
        base = dist.distributed_c10d._get_default_store()
    except Exception:  # pragma: no cover - a private torch API; diagnosis then names no rank
        return None, "", ()
    inner = base
    while isinstance(inner, dist.PrefixStore):
        inner = inner.underlying_store
    where = f" at {inner.host}:{inner.port}" if isinstance(inner, dist.TCPStore) else ""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        host, ranks = f"the torchrun agent that hosts it{where}", ()
    elif created_default:  # env:// rendezvous made here: rank 0 hosts the TCPStore
        host, ranks = f"rank 0, which hosts it{where},", (0,)
    else:
        host, ranks = f"its host{where} (rank 0, unless a launcher hosts it)", (0,)
    try:
        base = base.clone()
    except Exception:  # a store that cannot be cloned (FileStore, HashStore) is shared with its other users
        pass
    return dist.PrefixStore(name, base), host, ranks
