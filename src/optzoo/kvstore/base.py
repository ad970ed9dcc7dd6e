"""The KVStore contract between the :class:`~optzoo.Trainer` and a distributed store.

A store moves gradients (and, for ``dist_async``, weights) between the processes of a job. The Trainer
talks to it only through this interface:

- synchronous stores (``dist_sync``, ``update_on_kvstore=False``): ``init`` makes every rank's parameters
  rank 0's, then every step ``agree_grads`` settles which gradients are fresh (and which are row-sparse) on
  any worker and ``allreduce_grads`` sums the gradients in place (the local optimizer then runs identically
  on every rank);
- ``dist_async`` (``update_on_kvstore=True``): ``set_optimizer`` hands the optimizer to the server,
  ``init`` registers the parameters there and pulls them, and every step ``pushpull`` pushes the
  gradients, lets the server update, and pulls the new weights into the parameters in place.
"""
from __future__ import annotations

import torch

__all__ = ["KVStore", "DistributedError"]


class DistributedError(RuntimeError):
    """A collective failed: another worker died, hung past the timeout, or the job is inconsistent.

    ``ranks`` lists the ranks found responsible (empty when unknown); the message names them.
    """

    def __init__(self, message, ranks=()):
        super().__init__(message)
        self.ranks = tuple(ranks)


class KVStore:
    """Base class of the distributed stores (see the module docstring for the protocol).

    Attributes
    ----------
    type : str
        ``'dist_sync'``, ``'dist_device_sync'`` or ``'dist_async'``.
    rank, num_workers : int
        This worker's rank and the number of workers.
    update_on_kvstore : bool
        True when the store applies the optimizer (``dist_async``); the Trainer then calls ``pushpull``.
    bytes_sent : int
        Payload bytes this worker has contributed to collectives so far (see each store).
    """

    type: str = ""
    rank: int = 0
    num_workers: int = 1
    update_on_kvstore: bool = False
    bytes_sent: int = 0

    def set_optimizer(self, optimizer) -> None:
        """Give the store the optimizer it applies (``update_on_kvstore`` stores only)."""
        raise NotImplementedError(f"kvstore {self.type!r} does not update on the store")

    def init(self, names: list[str], params: list[torch.Tensor]) -> None:
        """Make the parameters consistent across workers, in place (sync: rank 0's values everywhere;
        async: register them on the server and pull)."""
        raise NotImplementedError

    def allreduce_grads(self, indices: list[int], params: list[torch.Tensor]) -> None:
        """Sum ``p.grad`` over all workers, in place (sync stores)."""
        raise NotImplementedError(f"kvstore {self.type!r} updates on the store: it has no allreduce_grads")

    def pushpull(self, indices: list[int], params: list[torch.Tensor], rescale_grad: float) -> None:
        """Push ``p.grad``, let the store update with ``rescale_grad``, pull the new weights into ``p``
        in place (``update_on_kvstore`` stores only)."""
        raise NotImplementedError(f"kvstore {self.type!r} does not update on the store: it has no pushpull")

    def agree(self, flags: list[bool]) -> list[bool]:
        """Per-parameter flags ORed over the workers that step together (sync stores: which gradients are
        fresh on any worker, so that every worker updates the same parameters). Default: unchanged."""
        return list(flags)

    def agree_grads(self, flags: list[bool], indices: list[int], grads: list) -> list[bool]:
        """:meth:`agree` for the parameters ``indices`` whose gradients (``p.grad``, None allowed) are
        ``grads``: a store may settle other per-parameter facts in the same exchange (``dist_sync``: which
        gradients are row-sparse on any worker). Default: ``agree(flags)``."""
        return self.agree(flags)

    def barrier(self) -> None:
        """Wait for every worker (sync stores; default: nothing to wait for)."""

    def close(self) -> None:
        """Release what the store holds (process groups it created, threads, connections)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"<{type(self).__name__} type={self.type!r} rank={self.rank} num_workers={self.num_workers}>"
