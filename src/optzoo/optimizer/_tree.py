"""Helpers over optimizer states: nested tuples of tensors and Nones, in MXNet's layout."""
from __future__ import annotations

import torch

_OWNER = "_optzoo_owner"


def leaves(state):
    """The tensors of a state, depth first."""
    if state is None:
        return []
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, (tuple, list)):
        return [leaf for part in state for leaf in leaves(part)]
    raise TypeError(f"optimizer state holds a {type(state).__name__}: expected tensors, tuples and None")


def tag(state, owner: str):
    """Mark every tensor of a freshly created state with the optimizer class that made it."""
    for leaf in leaves(state):
        setattr(leaf, _OWNER, owner)
    return state


def owner_of(state):
    """The optimizer class name a state was created by, if it still carries the mark."""
    for leaf in leaves(state):
        owner = getattr(leaf, _OWNER, None)
        if owner is not None:
            return owner
    return None


def describe(state):
    """A short structural description, for error messages."""
    if state is None:
        return "None"
    if isinstance(state, torch.Tensor):
        return f"Tensor{tuple(state.shape)}:{str(state.dtype).replace('torch.', '')}"
    if isinstance(state, (tuple, list)):
        return "(" + ", ".join(describe(s) for s in state) + ("," if len(state) == 1 else "") + ")"
    return type(state).__name__


def same_structure(expected, actual, device) -> bool:
    """True when ``actual`` has ``expected``'s nesting, shapes and dtypes, and lives on ``device``."""
    if expected is None:
        return actual is None
    if isinstance(expected, torch.Tensor):
        return (isinstance(actual, torch.Tensor) and actual.shape == expected.shape
                and actual.dtype == expected.dtype and actual.device == device)
    if isinstance(expected, (tuple, list)):
        return (isinstance(actual, (tuple, list)) and len(actual) == len(expected)
                and all(same_structure(e, a, device) for e, a in zip(expected, actual)))
    return True


def assign(dst, src) -> None:
    """Write ``src`` into the tensors of ``dst`` in place (same nesting)."""
    if dst is None or src is None or src is dst:
        return
    if isinstance(dst, torch.Tensor):
        dst.copy_(src)
        return
    for d, s in zip(dst, src):
        assign(d, s)


def to_plain(state):
    """Plain tuples of tensors (what torch.load(weights_only=True) accepts), detached copies."""
    if state is None:
        return None
    if isinstance(state, torch.Tensor):
        return state.detach().clone()
    return tuple(to_plain(s) for s in state)


def detached(state):
    """The same tensors as plain (untagged, detached) views: what a state dict hands out, as torch's does."""
    if state is None:
        return None
    if isinstance(state, torch.Tensor):
        return state.detach()
    return tuple(detached(s) for s in state)


def to_device(state, device):
    if state is None:
        return None
    if isinstance(state, torch.Tensor):
        return state.to(device)
    return tuple(to_device(s, device) for s in state)
