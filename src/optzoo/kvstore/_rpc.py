"""Joining the dist_async rpc group (TensorPipe) with a time limit, and resolving ranks."""
from __future__ import annotations

import os
import threading
import warnings

from .base import DistributedError

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
