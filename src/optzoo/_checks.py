"""Argument checks shared by every optimizer and scheduler.

Each check raises before anything is modified and names the argument, the value and what was expected.
"""
from __future__ import annotations

import math
import numbers

import torch

__all__ = [
    "check_number", "check_nonnegative", "check_unit_interval", "check_positive_int",
    "check_optional_clip", "check_choice", "check_tensor_pair",
]


def check_number(name: str, value, *, allow_none: bool = False) -> float | None:
    """A finite real number (bools rejected), or None when ``allow_none``."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(f"{name}={value!r} is invalid: expected a finite real number"
                         + (" or None" if allow_none else ""))
    return value


def check_nonnegative(name: str, value, *, allow_none: bool = False):
    """A finite number >= 0."""
    value = check_number(name, value, allow_none=allow_none)
    if value is not None and value < 0:
        raise ValueError(f"{name}={value!r} is invalid: expected a value >= 0")
    return value


def check_unit_interval(name: str, value):
    """A decay factor in [0, 1): momentum, beta1, beta2, rho, gamma1, gamma2."""
    value = check_number(name, value)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name}={value!r} is invalid: expected a value in [0, 1)")
    return value


def check_positive_int(name: str, value, *, minimum: int = 1):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name}={value!r} is invalid: expected an integer >= {minimum}")
    return int(value)


def check_optional_clip(name: str, value):
    """``clip_gradient`` / ``clip_weights``: None (or 0, MXNet's falsy "off") or a positive bound.

    MXNet's C++ operators document "clip_gradient <= 0 turns clipping off"; its Python optimizers
    pass the value to those operators only when it is truthy, yet clip with 0 (zeroing every
    gradient) in the Python-implemented ones. optzoo keeps one rule: None or 0 disable clipping,
    a negative bound is an error.
    """
    value = check_number(name, value, allow_none=True)
    if value is not None and value < 0:
        raise ValueError(f"{name}={value!r} is invalid: expected None (no clipping) or a value >= 0")
    return value


def check_choice(name: str, value, choices):
    if value not in choices:
        raise ValueError(f"{name}={value!r} is invalid: expected one of {', '.join(map(repr, choices))}")
    return value


def check_tensor_pair(index, weight, grad) -> None:
    """A gradient must match its weight: floating weight, dense grad of the same shape, dtype, device."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight for index {index!r} is a {type(weight).__name__}: expected a torch.Tensor")
    if not isinstance(grad, torch.Tensor):
        raise TypeError(f"grad for index {index!r} is a {type(grad).__name__}: expected a torch.Tensor")
    if not weight.is_floating_point():
        raise TypeError(f"weight for index {index!r} has dtype {weight.dtype}: expected a floating-point tensor")
    if grad.layout != torch.strided:
        raise TypeError(f"grad for index {index!r} has layout {grad.layout}: sparse (row-sparse) gradients "
                        "are not supported yet; pass a dense gradient (grad.to_dense())")
    if grad.shape != weight.shape:
        raise ValueError(f"grad for index {index!r} has shape {tuple(grad.shape)}: expected the weight's "
                         f"shape {tuple(weight.shape)}")
    if grad.dtype != weight.dtype:
        raise TypeError(f"grad for index {index!r} has dtype {grad.dtype}: expected the weight's dtype {weight.dtype}")
    if grad.device != weight.device:
        raise ValueError(f"grad for index {index!r} is on {grad.device}: expected the weight's device {weight.device}")
