"""The opt-in flat, owning layout: parameters (and gradients) re-bound to views of one buffer.

By default optzoo leaves your tensors alone: small parameters are copied into scratch buffers for one
kernel call and copied back. :func:`flatten_parameters` is the explicit opt-in that removes those copies,
at the price of taking ownership of the storage (what ``torch.nn.utils.parameters_to_vector`` users and
Apex's flat master buffers do): the executor finds the parameters end to end in one buffer and updates
them in place, in one kernel call.
"""
from __future__ import annotations

import torch

__all__ = ["flatten_parameters"]


@torch.no_grad()
def flatten_parameters(params, *, grads: bool = True) -> list:
    """Re-bind every parameter's ``.data`` to a view of one contiguous buffer per dtype and device (in the
    order given), and, with ``grads``, its ``.grad`` to a view of a matching gradient buffer (existing
    gradients are copied in; absent ones start at zero). Parameters that do not require a gradient are
    left as they are. Returns the weight buffers.

    What you take on by opting in:

    - each parameter becomes a contiguous view (a ``channels_last`` weight becomes NCHW; its values are
      kept), and ``p.data = ...``, ``model.to(...)`` or ``load_state_dict(..., assign=True)`` afterwards
      replace the views: the optimizer is still right, only the speed-up is gone (call this again);
    - gradients stay views only while autograd accumulates into them: zero them with
      ``optimizer.zero_grad(set_to_none=False)`` (the default ``set_to_none=True`` drops the views, and
      the next backward allocates ordinary gradients: right again, only slower);
    - ``torch.save`` of one parameter writes its whole buffer, and ``safetensors`` refuses shared storage
      (save ``{k: v.clone() for k, v in model.state_dict().items()}``).
    """
    params = [p for p in params if p.requires_grad]
    groups = {}
    for p in params:
        groups.setdefault((p.dtype, p.device), []).append(p)
    buffers = []
    for members in groups.values():
        flat = torch._C._nn.flatten_dense_tensors([p.detach() for p in members])
        for p, view in zip(members, torch._C._nn.unflatten_dense_tensors(flat, members)):
            p.data = view
        if grads:
            gflat = torch.zeros_like(flat)
            for p, view in zip(members, torch._C._nn.unflatten_dense_tensors(gflat, members)):
                if p.grad is not None:
                    view.copy_(p.grad)
                p.grad = view
        buffers.append(flat)
    return buffers
