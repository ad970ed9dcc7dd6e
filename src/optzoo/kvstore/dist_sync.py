"""``dist_sync`` / ``dist_device_sync``: synchronous data parallelism over torch.distributed collectives.

Every step, each worker's gradients are summed over all workers (``allreduce_grads``), then every worker
runs the same optimizer on the same sums: the weights stay identical everywhere, and ``N`` workers each on
a slice of a batch equal one process on the whole batch (per-tensor norms of LARS/LAMB, LBSGD's batch
scale are those of the global gradient). Optimizers with a sign-vote split (Signum, SignSGD) send one
bit per element instead (``vote``); with ``compression_params={'type': '2bit', ...}`` gradients go as
MXNet's 2-bit codes.

Gradients of one device and dtype are flattened into buckets of at most ``bucket_bytes`` (25 MB, as DDP)
and each bucket is one collective; when the gradients already lie back to back in memory (the Trainer's
fast path keeps them in one flat buffer) the bucket is reduced in place without a copy.

Row-sparse gradients (``torch.sparse_coo`` with ``sparse_dim == 1`` over a dense weight's rows, as
``nn.Embedding(sparse=True)`` gives) are summed without densifying them: the workers all-gather their row
counts, then their row ids and rows (each padded to the largest count), and every worker builds the same
coalesced sum (repeated rows added, sorted); the optimizer then applies its lazy or standard sparse rule to
it, identically everywhere. Whether a gradient is row-sparse is agreed by all workers first (with the
fresh flags, :meth:`DistSync.agree_grads`): a gradient row-sparse on one worker and absent on another is an
empty row set there; one that is dense on any worker is densified on the others and summed densely.
"""
from __future__ import annotations

import hashlib
import math

import torch
import torch.distributed as dist

from . import compression as _comp
from . import signs as _signs
from ._group import Collectives, timeout_seconds
from ._rows import SPARSE as _SPARSE, layout_code as _layout_code, local_rows as _local_rows
from .base import DistributedError, KVStore

__all__ = ["DistSync", "BUCKET_BYTES"]

# torch >= 2.10 renamed all_gather_into_tensor (which now warns)
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
#: Bytes of one gradient bucket (DDP's default bucket_cap_mb = 25).
BUCKET_BYTES = 25 * 1024 * 1024


class DistSync(KVStore):
    """The synchronous distributed store (see the module docstring).

    Parameters
    ----------
    type : 'dist_sync' or 'dist_device_sync'
    timeout : float seconds, optional
        How long a collective waits for the other workers before raising :class:`DistributedError`;
        default ``$OPTZOO_DIST_TIMEOUT``, else 300.
    compression_params : dict, optional
        ``{'type': '2bit', 'threshold': 0.5}`` (MXNet 1.9.1's only kind).
    bucket_bytes : int
        Upper size of one collective's payload.

    ``bytes_sent`` counts the payload bytes this worker contributes to the step collectives (gradient
    sums, sign bits, 2-bit codes): ``4n`` per step for ``n`` fp32 gradient elements, ``ceil(n/8)`` for
    signs, ``4 ceil(n/16)`` for 2-bit codes (per bucket). A row-sparse gradient of a ``(V, d)`` fp32 weight
    costs ``(8 + 4d) * K`` per step, ``K`` the largest number of distinct rows any worker touched in that
    step (every worker pads its int64 row ids and its rows to ``K`` for the all-gather): proportional to the
    rows touched, never to ``V``. ``control_bytes`` counts the rest (the initial broadcast and consistency
    check; per step, two bytes per parameter to agree on which gradients are fresh and which are row-sparse
    on any worker, and eight bytes per row-sparse parameter for its row count).

    Row-sparse gradients cannot be 2-bit compressed or sign-voted (as MXNet 1.9.1, whose gradient
    compression takes dense gradients only): every worker raises the same ValueError naming the parameter,
    before anything changes.
    """

    update_on_kvstore = False

    def __init__(self, type="dist_sync", timeout=None, compression_params=None, bucket_bytes=BUCKET_BYTES):
        if type not in ("dist_sync", "dist_device_sync"):
            raise ValueError(f"type={type!r} is invalid: expected 'dist_sync' or 'dist_device_sync'")
        if isinstance(bucket_bytes, bool) or not isinstance(bucket_bytes, int) or bucket_bytes < 1:
            raise ValueError(f"bucket_bytes={bucket_bytes!r} is invalid: expected an int >= 1")
        self.type = type
        self.timeout = timeout_seconds(timeout)
        self.compression = _comp.parse_compression_params(compression_params)
        self.bucket_bytes = bucket_bytes
        self.bytes_sent = 0
        self.control_bytes = 0
        self._residuals = {}
        self._net = None
        self._names = None
        self._layouts = None  # index -> agreed layout code, from the last agree_grads

    # ------------------------------------------------------------------ group
    @property
    def rank(self) -> int:
        return self._net.rank if self._net else (dist.get_rank() if dist.is_initialized() else 0)

    @property
    def num_workers(self) -> int:
        return self._net.size if self._net else (dist.get_world_size() if dist.is_initialized() else 1)

    def _connect(self, device_type):
        if self._net is None:
            self._net = Collectives(self.type, device_type, self.timeout)
        return self._net

    def init(self, names, params):
        """Check that every worker has the same parameter names, shapes and dtypes, then broadcast rank
        0's values into every worker's parameters (in place)."""
        types = {p.device.type for p in params}
        if len(types) != 1:
            raise ValueError(f"{self.type}: parameters on device types {sorted(types)}: expected one device type")
        net = self._connect(types.pop())
        self._names = list(names)
        device = self._control_device = params[0].device
        digest = hashlib.sha256(repr([(n, tuple(p.shape), str(p.dtype)) for n, p in zip(names, params)]).encode())
        mine = torch.tensor(list(digest.digest()[:8]), dtype=torch.uint8, device=device)
        every = torch.empty(net.size * 8, dtype=torch.uint8, device=device)
        net.call("checking the parameters", _all_gather, every, mine)
        self.control_bytes += 8
        differ = [r for r, d in enumerate(every.view(net.size, 8)) if not torch.equal(d, every[:8])]
        if differ:
            raise DistributedError(f"{self.type}: rank(s) {differ} have other parameter names, shapes or dtypes "
                                   "than rank 0: every worker must build the same model", differ)
        with torch.no_grad():
            for chunk in self._buckets([p.detach() for p in params]):
                flat, copy_back = _flat(chunk)
                net.call("broadcasting the parameters", dist.broadcast, flat, src=0)
                self.control_bytes += flat.numel() * flat.element_size()
                copy_back()

    # ------------------------------------------------------------------ step collectives
    def agree(self, flags):
        """Per-parameter flags ORed over all workers (which gradients are fresh anywhere)."""
        self._layouts = None
        if self._net is None or not flags:
            return list(flags)
        t = torch.tensor([bool(f) for f in flags], dtype=torch.uint8, device=self._control_device)
        self._net.call("agreeing on fresh gradients", dist.all_reduce, t, op=dist.ReduceOp.MAX)
        self.control_bytes += t.numel()
        return [bool(f) for f in t.tolist()]

    def agree_grads(self, flags, indices, grads):
        """:meth:`agree`, and in the same collective which of ``grads`` (of the parameters ``indices``) are
        row-sparse or dense on any worker, kept for the next :meth:`allreduce_grads` (or sign vote)."""
        self._layouts = None
        if self._net is None or not flags:
            return list(flags)
        n = len(flags)
        t = torch.tensor([bool(f) for f in flags] + [_layout_code(g) for g in grads], dtype=torch.uint8,
                         device=self._control_device)
        self._net.call("agreeing on fresh gradients", dist.all_reduce, t, op=dist.ReduceOp.MAX)
        self.control_bytes += t.numel()
        codes = t.tolist()
        self._layouts = dict(zip(indices, codes[n:]))
        return [bool(f) for f in codes[:n]]

    def _agreed_layouts(self, net, indices, params):
        """Per parameter, the layout code agreed over the workers (max: dense > row-sparse > no gradient):
        the one :meth:`agree_grads` kept for these indices, else agreed now (one collective)."""
        memo, self._layouts = self._layouts, None
        if memo is not None and all(i in memo for i in indices):
            return [memo[i] for i in indices]
        t = torch.tensor([_layout_code(p.grad) for p in params], dtype=torch.uint8, device=self._control_device)
        net.call("agreeing on gradient layouts", dist.all_reduce, t, op=dist.ReduceOp.MAX)
        self.control_bytes += t.numel()
        return t.tolist()

    def refuse_sparse(self, indices, params, what):
        """Raise the same ValueError on every worker when a gradient of ``params`` is row-sparse on any
        worker (``what`` cannot take it); nothing changes."""
        net = self._require()
        for i, code in zip(indices, self._agreed_layouts(net, indices, params)):
            if code == _SPARSE:
                raise ValueError(f"{self.type}: the gradient of parameter {self._name(i)!r} is row-sparse (on at "
                                 f"least one worker): {what} takes dense gradients only; use a dense gradient "
                                 "(nn.Embedding(sparse=False)) for it")

    def allreduce_grads(self, indices, params):
        """Sum ``p.grad`` over all workers in place (a missing gradient counts as zeros and is created).

        A gradient row-sparse on any worker (and dense on none) is summed as rows (see the module
        docstring): ``p.grad`` becomes the coalesced row-sparse sum, the same on every worker."""
        net = self._require()
        layouts = self._agreed_layouts(net, indices, params)
        sparse = [k for k, code in enumerate(layouts) if code == _SPARSE]
        if sparse and self.compression is not None:
            raise ValueError(f"{self.type}: the gradient of parameter {self._name(indices[sparse[0]])!r} is "
                             "row-sparse (on at least one worker): 2-bit compression (compression_params) takes "
                             "dense gradients only, as MXNet 1.9.1's; use a dense gradient (nn.Embedding("
                             "sparse=False)) for it or drop compression_params")
        if sparse:
            self._allreduce_sparse(net, [indices[k] for k in sparse], [params[k] for k in sparse])
            keep = [k for k in range(len(indices)) if layouts[k] != _SPARSE]
            indices, params = [indices[k] for k in keep], [params[k] for k in keep]
            if not params:
                return
        grads = []
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            elif p.grad.layout is not torch.strided:  # dense on another worker: summed densely
                p.grad = p.grad.coalesce().to_dense()
            grads.append(p.grad)
        if self.compression is not None:
            pos = {id(g): i for i, g in zip(indices, grads)}
            for chunk in self._buckets(grads):
                self._allreduce_2bit(net, [pos[id(g)] for g in chunk], chunk)
            return
        with torch.no_grad():
            for chunk in self._buckets(grads):
                flat, copy_back = _flat(chunk)
                net.call("summing gradients", dist.all_reduce, flat)
                self.bytes_sent += flat.numel() * flat.element_size()
                copy_back()

    def _allreduce_sparse(self, net, indices, params):
        """Sum the row-sparse gradients of ``params`` over the workers: row counts, then row ids (one
        all-gather for every parameter) and rows (one per dtype), each worker's padded to the largest count;
        every worker concatenates them in rank order and coalesces (repeated rows summed)."""
        local, error = [], None
        for i, p in zip(indices, params):
            try:
                local.append(_local_rows(p, self._name(i)))
            except (TypeError, ValueError) as exc:
                local.append(None)
                error = error or exc
        counts = torch.tensor([-1 if x is None else x[0].numel() for x in local], dtype=torch.int64,
                              device=self._control_device)
        every = counts.new_empty(net.size * counts.numel())
        net.call("gathering row counts", _all_gather, every, counts)
        self.control_bytes += counts.numel() * counts.element_size()
        if error is not None:  # every other worker raises too (below), naming this one: nothing was summed
            raise error
        every = every.view(net.size, -1)
        bad = sorted({r for r, k in (every < 0).nonzero().tolist()})
        if bad:
            k = int((every < 0).any(0).nonzero()[0])
            raise DistributedError(f"{self.type}: rank(s) {bad} refused the row-sparse gradient of "
                                   f"{self._name(indices[k])!r} (their error says why); no gradient was summed", bad)
        counts = every.tolist()                      # counts[r][k]: rows of worker r for parameter k
        tops = [max(c[k] for c in counts) for k in range(len(params))]
        device = params[0].device
        id_at, row_at, widths, sizes = [], [], [], {}
        for p, top in zip(params, tops):             # where parameter k lies in the id and row payloads
            id_at.append(sum(tops[:len(id_at)]))
            widths.append(math.prod(p.shape[1:]))
            row_at.append(sizes.get(p.dtype, 0))
            sizes[p.dtype] = row_at[-1] + top * widths[-1]
        with torch.no_grad():
            ids = torch.zeros(sum(tops), dtype=torch.int64, device=device)
            rows = {dtype: torch.zeros(n, dtype=dtype, device=device) for dtype, n in sizes.items()}
            for k, (p, (row_ids, values)) in enumerate(zip(params, local)):
                ids[id_at[k]:id_at[k] + row_ids.numel()] = row_ids
                rows[p.dtype][row_at[k]:row_at[k] + values.numel()] = values.reshape(-1)
            all_ids, all_rows = ids.new_empty(0), {}
            if ids.numel():
                all_ids = ids.new_empty(net.size * ids.numel())
                net.call("gathering row ids", _all_gather, all_ids, ids)
                self.bytes_sent += ids.numel() * ids.element_size()
                all_ids = all_ids.view(net.size, -1)
            for dtype, flat in rows.items():
                if flat.numel():
                    out = flat.new_empty(net.size * flat.numel())
                    net.call("gathering rows", _all_gather, out, flat)
                    self.bytes_sent += flat.numel() * flat.element_size()
                    all_rows[dtype] = out.view(net.size, -1)
            for k, p in enumerate(params):
                if tops[k] == 0:  # no worker touched a row: an empty row set
                    row_ids, values = local[k]
                else:  # rank order, so that every worker builds the same tensor
                    c = [counts[r][k] for r in range(net.size)]
                    row_ids = torch.cat([all_ids[r, id_at[k]:id_at[k] + c[r]] for r in range(net.size)])
                    values = torch.cat([all_rows[p.dtype][r, row_at[k]:row_at[k] + c[r] * widths[k]]
                                        for r in range(net.size)]).view(-1, *p.shape[1:])
                p.grad = torch.sparse_coo_tensor(row_ids.unsqueeze(0), values, p.shape,
                                                 check_invariants=False).coalesce()

    def _name(self, index):
        names = self._names
        return names[index] if names is not None and 0 <= index < len(names) else f"#{index}"

    def _allreduce_2bit(self, net, indices, grads):
        th = self.compression.threshold
        for i, g in zip(indices, grads):
            r = self._residuals.get(i)
            if r is None or r.shape != g.shape or r.device != g.device:
                self._residuals[i] = torch.zeros(g.shape, dtype=torch.float32, device=g.device)
        with torch.no_grad():
            flat, grads_back = _flat(grads)
            res, residuals_back = _flat([self._residuals[i] for i in indices])
            q, new_res = _comp.quantize(flat, res, th)
            res.copy_(new_res)
            residuals_back()
            packed = _comp.pack_2bit(q)
            every = packed.new_empty(net.size * packed.numel())
            net.call("gathering 2-bit gradients", _all_gather, every, packed)
            self.bytes_sent += packed.numel()
            codes = _comp.unpack_2bit(every.view(net.size, -1), flat.numel())
            # as MXNet's server: dequantise each push and add them in turn
            total = codes[0].to(flat.dtype) * th
            for r in range(1, net.size):
                total = total + codes[r].to(flat.dtype) * th
            flat.copy_(total)
            grads_back()

    def vote(self, directions):
        """The majority vote :math:`\\mathrm{sign}(\\sum_r \\mathrm{sign}(x_r))` of every worker's tensors
        (int8, same shapes), sending one bit per element (0 counts as +1, see :mod:`.signs`)."""
        net = self._require()
        out = [None] * len(directions)
        pos = {id(x): k for k, x in enumerate(directions)}
        for chunk in self._buckets(directions, element_bytes=0.125):
            bits = torch.cat([x.reshape(-1) >= 0 for x in chunk])
            packed = _signs.pack_signs(bits)
            every = packed.new_empty(net.size * packed.numel())
            net.call("gathering signs", _all_gather, every, packed)
            self.bytes_sent += packed.numel()
            votes = _signs.vote(every.view(net.size, -1), bits.numel())
            for x, v in zip(chunk, torch.split(votes, [x.numel() for x in chunk])):
                out[pos[id(x)]] = v.view(x.shape)
        return out

    def barrier(self):
        if self._net is not None:
            self._net.call("waiting at a barrier", dist.barrier)

    def close(self):
        if self._net is not None:
            self._net.close()
            self._net = None

    # ------------------------------------------------------------------ helpers
    def _require(self):
        if self._net is None:
            raise RuntimeError(f"{self.type}: call init(names, params) first (the Trainer does)")
        return self._net

    def _buckets(self, tensors, element_bytes=None):
        """Tensors grouped by device and dtype, in order, into chunks of at most ``bucket_bytes``."""
        groups = {}
        for t in tensors:
            groups.setdefault((t.device, t.dtype), []).append(t)
        for members in groups.values():
            chunk, size = [], 0
            for t in members:
                n = t.numel() * (element_bytes or t.element_size())
                if chunk and size + n > self.bucket_bytes:
                    yield chunk
                    chunk, size = [], 0
                chunk.append(t)
                size += n
            if chunk:
                yield chunk


def _flat(tensors):
    """``(flat, copy_back)``: one flat tensor over ``tensors`` and the function that writes it back; when
    they are contiguous and back to back in one storage, a view of it (nothing to copy)."""
    first = tensors[0]
    offset, ok = first.storage_offset(), True
    for t in tensors:
        if not t.is_contiguous() or t.untyped_storage().data_ptr() != first.untyped_storage().data_ptr() \
                or t.storage_offset() != offset:
            ok = False
            break
        offset += t.numel()
    if ok:
        start = first.storage_offset()
        flat = first.new_empty(0).set_(first.untyped_storage(), start, (offset - start,))
        return flat, lambda: None
    flat = torch.cat([t.reshape(-1) for t in tensors])

    def copy_back():
        for t, part in zip(tensors, torch.split(flat, [t.numel() for t in tensors])):
            t.copy_(part.view_as(t))
    return flat, copy_back
