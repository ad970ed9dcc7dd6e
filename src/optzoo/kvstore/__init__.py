"""Distributed kvstores on torch.distributed: ``create('dist_sync' | 'dist_device_sync' | 'dist_async')``.

The :class:`~optzoo.Trainer` creates one from its ``kvstore`` argument; create one yourself to set its
options (``optzoo.kvstore.create('dist_sync', timeout=60)``) and pass it as ``kvstore=``.
"""
from __future__ import annotations

from .base import DistributedError, KVStore

__all__ = ["create", "KVStore", "DistributedError", "KINDS", "DIST_KINDS", "normalize", "run_server"]

#: MXNet's spelling ``dist_sync_device`` is an alias of ``dist_device_sync``.
_ALIASES = {"dist_sync_device": "dist_device_sync"}
DIST_KINDS = ("dist_sync", "dist_device_sync", "dist_async")
#: Every kind a Trainer accepts (None, 'local' and 'device' use no store).
KINDS = (None, "local", "device") + DIST_KINDS + tuple(_ALIASES)
_UNSUPPORTED = ("nccl", "horovod")


def normalize(kind):
    """The canonical name of a kvstore kind; clear errors for unknown and unsupported ones."""
    if kind in _UNSUPPORTED:
        raise NotImplementedError(f"kvstore={kind!r} is not supported: optzoo's distributed kvstores run on "
                                  "torch.distributed; use 'dist_sync' (NCCL collectives when the parameters are "
                                  "on CUDA) or 'dist_async'")
    if kind not in KINDS:
        raise ValueError(f"kvstore={kind!r} is invalid: expected one of {KINDS} or a KVStore")
    return _ALIASES.get(kind, kind)


def create(name="dist_sync", **kwargs) -> KVStore:
    """A distributed store.

    ``create('dist_sync', timeout=None, compression_params=None)`` (also ``'dist_device_sync'`` and its
    alias ``'dist_sync_device'``): see :class:`~optzoo.kvstore.dist_sync.DistSync`.
    ``create('dist_async', ...)``: the parameter server of :mod:`optzoo.kvstore.dist_async`.
    """
    kind = normalize(name)
    if kind in (None, "local", "device"):
        raise ValueError(f"kvstore {name!r} is one process, one device: it needs no store (pass kvstore={name!r} "
                         "to the Trainer)")
    if kind == "dist_async":
        from .dist_async import DistAsync  # helper module, imported only when asked for
        return DistAsync(**kwargs)
    from .dist_sync import DistSync
    return DistSync(kind, **kwargs)


def __getattr__(name):
    # dist_async's server loop, imported only when asked for (it pulls in torch.distributed.rpc)
    if name == "run_server":
        from .dist_async import run_server
        return run_server
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
