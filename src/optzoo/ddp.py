"""DDP communication hooks: MXNet's 2-bit compression and Signum's majority vote for
``torch.nn.parallel.DistributedDataParallel`` users (see ``docs/ddp-hooks.md``).

Two hooks for ``ddp_model.register_comm_hook(state, hook)``, each the same exchange as
``optzoo.Trainer(kvstore='dist_sync')`` (the packing, quantisation and vote are :mod:`optzoo.kvstore`'s own)::

    state = optzoo.ddp.TwoBitState(threshold=0.5)
    ddp_model.register_comm_hook(state, optzoo.ddp.twobit_hook)

    opt = optzoo.torch.Signum(ddp_model.parameters(), lr=0.01, momentum=0.9, rescale_grad=1 / total_batch)
    ddp_model.register_comm_hook(optzoo.ddp.SignumVoteState(opt), optzoo.ddp.signum_vote_hook)

``twobit_hook`` quantises the gradient each worker's backward produced (error feedback in a residual per
*parameter*: DDP rebuilds its buckets after the first step, so bucket slices are mapped back to parameters),
sends the codes packed 16 per 32-bit word with ``all_gather``, decodes them, sums them in rank order as MXNet's
server does and hands DDP the **mean** over the workers, as DDP's own hooks do.

``signum_vote_hook`` sends one bit per element: the sign of each worker's own Signum direction (its momentum
advanced with its own gradient; SignSGD: the gradient). The hook leaves every worker's local gradient in
``.grad``; the state's step hooks on the optimizer make ``opt.step()`` step by the majority vote with
Signum's decay terms (``direction`` / ``apply_vote``, the two halves of the rule in
:mod:`optzoo.optimizer.signum`) and keep the worker's own momentum.

``state.bytes_sent`` counts the payload this worker hands to ``torch.distributed`` (cumulative, as the
kvstore's ``bytes_sent``): ``4 ceil(n/16)`` bytes per bucket of ``n`` elements for 2-bit codes,
``ceil(n/8)`` for signs, against ``4n`` for DDP's fp32 all-reduce.
"""
# no ``from __future__ import annotations``: DDP's register_comm_hook checks that a hook's return annotation is
# torch.futures.Future[torch.Tensor]
import torch
import torch.distributed as dist

from .kvstore import compression as _comp
from .kvstore import signs as _signs
from .optimizer import _tree
from .torch import OptzooOptimizer

__all__ = ["TwoBitState", "twobit_hook", "SignumVoteState", "signum_vote_hook"]

_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_LOW = (torch.float16, torch.bfloat16)


def _gather(out, inp, group):
    """``all_gather`` of ``inp`` into ``out`` (looked up at each call; torch >= 2.10 renamed
    ``all_gather_into_tensor``, which now warns)."""
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return fn(out, inp, group=group, async_op=True)


def _check_bucket(hook, bucket):
    buf = bucket.buffer()
    if buf.dtype not in _FLOATS:
        raise TypeError(f"{hook}: gradients of dtype {buf.dtype} are not supported: expected float32, float64, "
                        "float16 or bfloat16")
    grads = bucket.gradients()
    # DDP lays a bucket's gradients back to back in its buffer; the codes of element k belong to the k-th element
    # of the concatenated gradients
    if sum(g.numel() for g in grads) != buf.numel():
        raise RuntimeError(f"{hook}: the bucket's gradients hold {sum(g.numel() for g in grads)} elements and its "
                           f"buffer {buf.numel()}: expected DDP's layout (gradients back to back in the buffer)")
    return buf, grads


def _world(group):
    group = group if group is not None else dist.group.WORLD
    return group, dist.get_world_size(group)


# ---------------------------------------------------------------------------- 2-bit compression
class TwoBitState:
    """The state of :func:`twobit_hook`: MXNet's 2-bit compression with error feedback.

    Parameters
    ----------
    threshold : float > 0
        :math:`\\theta`, in the units of the local gradient as backward produced it (the Trainer quantises the
        raw local gradient, before ``rescale_grad``).
    process_group : torch.distributed.ProcessGroup, optional
        The group to exchange codes in (default: the default group). Use the group DDP was built with.

    Attributes: ``residuals`` (parameter -> fp32 residual, made at a parameter's first bucket; not part of any
    ``state_dict``: a resumed run starts them at 0, as the Trainer's kvstore does), ``bytes_sent``.
    """

    def __init__(self, threshold, process_group=None):
        self.threshold = _comp.parse_compression_params({"type": "2bit", "threshold": threshold}).threshold
        self.process_group = process_group
        self.residuals = {}
        self.bytes_sent = 0


def twobit_hook(state: TwoBitState, bucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: the mean over the workers of their 2-bit quantised gradients (see the module docstring)."""
    buf, grads = _check_bucket("twobit_hook", bucket)
    group, size = _world(state.process_group)
    th = state.threshold
    residuals = []
    for p, g in zip(bucket.parameters(), grads):
        r = state.residuals.get(p)
        if r is None or r.shape != g.shape or r.device != g.device:
            r = state.residuals[p] = torch.zeros(g.shape, dtype=torch.float32, device=g.device)
        residuals.append(r)
    with torch.no_grad():
        q, new = _comp.quantize(buf, torch.cat([r.reshape(-1) for r in residuals]), th)
        for r, part in zip(residuals, torch.split(new, [r.numel() for r in residuals])):
            r.copy_(part.view_as(r))
        packed = _comp.pack_2bit(q)
        every = packed.new_empty(size * packed.numel())
        work = _gather(every, packed, group)
    state.bytes_sent += packed.numel()

    def mean(fut):
        fut.wait()
        with torch.no_grad():
            codes = _comp.unpack_2bit(every.view(size, -1), buf.numel())
            # as MXNet's server (and the kvstore): dequantise each push and add them in rank order
            total = codes[0].to(buf.dtype) * th
            for r in range(1, size):
                total = total + codes[r].to(buf.dtype) * th
            return buf.copy_(total.div_(size))
    return work.get_future().then(mean)


# ---------------------------------------------------------------------------- Signum's majority vote
class SignumVoteState:
    """The state of :func:`signum_vote_hook`, bound to an ``optzoo.torch`` optimizer with a sign-vote split
    (:class:`optzoo.torch.Signum`; SignSGD is ``momentum=0``).

    It registers a step pre-hook and post-hook on ``optimizer`` (``remove()`` takes them off). The optimizer
    owns the momentum (``optimizer.state[p]['mom']``, saved by its ``state_dict``); the hook computes each
    worker's next momentum from it and this worker's gradient, and ``opt.step()`` stores exactly that momentum
    and the weights stepped by the vote. Call ``opt.step()`` once after every synchronised backward: a step
    after a backward under ``no_sync()`` (no vote) raises RuntimeError before anything changes.

    Attributes: ``bytes_sent``.
    """

    def __init__(self, optimizer, process_group=None):
        cls = getattr(optimizer, "optimizer_class", None)
        if not isinstance(optimizer, OptzooOptimizer) or not (hasattr(cls, "direction") and hasattr(cls, "apply_vote")):
            raise TypeError(f"SignumVoteState(optimizer={type(optimizer).__module__}.{type(optimizer).__name__}) is "
                            "not supported: expected an optzoo.torch optimizer with a sign-vote split "
                            "(optzoo.torch.Signum; SignSGD is momentum=0)")
        for k, group in enumerate(optimizer.param_groups):
            if group.get("multi_precision") and any(p.dtype in _LOW for p in group["params"]):
                raise ValueError(f"SignumVoteState: param group {k} has multi_precision=True with fp16/bf16 "
                                 "parameters: not supported by signum_vote_hook (use fp32 parameters or "
                                 "multi_precision=False)")
        self.optimizer = optimizer
        self.process_group = process_group
        self.bytes_sent = 0
        self._voted = {}  # parameter -> (inner optimizer, scalars, new weight-side state, vote)
        self._voters = set()  # ids of the parameters the hook has seen
        self._apply = []
        self._handles = [optimizer.register_step_pre_hook(self._pre_step),
                         optimizer.register_step_post_hook(self._post_step)]

    def remove(self):
        """Take the step hooks off the optimizer."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def _where(self):
        """parameter id -> (group number, index across groups), as the optimizer numbers them."""
        out, base = {}, 0
        for g, group in enumerate(self.optimizer.param_groups):
            for k, p in enumerate(group["params"]):
                out[id(p)] = (g, base + k)
            base += len(group["params"])
        return out

    def _pre_step(self, opt, args, kwargs):
        where = self._where()
        missing = [where[id(p)][1] for p in _params(opt)
                   if p.grad is not None and id(p) in self._voters and p not in self._voted]
        if missing:
            raise RuntimeError(f"signum_vote_hook: opt.step() with gradients but no vote for parameter(s) {missing}: "
                               "the last backward did not synchronise (under no_sync()?) or step() was called twice; "
                               "call step() once after each synchronised backward")
        todo = []
        with torch.no_grad():
            for p, (inner, s, new_state, vote) in self._voted.items():
                if p.grad is None:  # the optimizer skips it too
                    continue
                g = where[id(p)][0]
                if opt.mxnet_optimizer(g) is not inner:
                    raise RuntimeError(f"signum_vote_hook: param group {g}'s hyperparameters changed between backward "
                                       "and opt.step(): the vote was taken with the old ones; change them after step()")
                w = p.detach()
                todo.append((p, inner.apply_vote(w, vote.to(w.dtype), s, new_state), new_state))
        self._voted = {}
        self._apply = todo

    def _post_step(self, opt, args, kwargs):
        # the optimizer's step counted the update and made or advanced the state with this worker's gradient:
        # the weight and momentum become the vote's
        todo, self._apply = self._apply, []
        with torch.no_grad():
            for p, w_new, new_state in todo:
                p.detach().copy_(w_new)
                _tree.assign(opt.mx_state(p), new_state)


def _params(opt):
    return [p for group in opt.param_groups for p in group["params"]]


def signum_vote_hook(state: SignumVoteState, bucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: the majority vote of the workers' Signum directions, 1 bit per element; ``.grad`` keeps this
    worker's gradient and ``opt.step()`` applies the vote (see :class:`SignumVoteState`)."""
    buf, grads = _check_bucket("signum_vote_hook", bucket)
    group, size = _world(state.process_group)
    opt = state.optimizer
    where = state._where()
    entries = []
    with torch.no_grad():
        for p, g in zip(bucket.parameters(), grads):
            if id(p) not in where:
                raise RuntimeError(f"signum_vote_hook: a parameter of shape {tuple(p.shape)} is in the DDP model but "
                                   "not in the optimizer: give the optimizer all of the model's parameters")
            gi, i = where[id(p)]
            inner = opt.mxnet_optimizer(gi)
            w = p.detach()
            if inner._mp(w):
                raise ValueError("signum_vote_hook: multi_precision with fp16/bf16 parameters is not supported")
            st = opt.state.get(p) or {}
            current = opt.mx_state(p)
            if current is None:
                current = inner.create_state(i, w)
            t = int(st.get("step", inner.begin_num_update)) + 1
            (lr,), (wd,) = inner._get_lrs([i]), inner._get_wds([i])
            s = inner.prepare(lr=lr, wd=wd, t=t, index=i, dtype=w.dtype)
            x, new_state = inner.direction(w, g.to(w.dtype), current, s)
            entries.append((p, inner, s, new_state, x))
        bits = torch.cat([x.reshape(-1) >= 0 for *_, x in entries])
        packed = _signs.pack_signs(bits)
        every = packed.new_empty(size * packed.numel())
        work = _gather(every, packed, group)
    state.bytes_sent += packed.numel()
    state._voters.update(id(e[0]) for e in entries)

    def record(fut):
        fut.wait()
        votes = _signs.vote(every.view(size, -1), bits.numel())
        for (p, inner, s, new_state, x), v in zip(entries, torch.split(votes, [e[4].numel() for e in entries])):
            state._voted[p] = (inner, s, new_state, v.view(x.shape))
        return buf  # this worker's own gradient stays in .grad
    return work.get_future().then(record)
