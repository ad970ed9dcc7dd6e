"""Argument checks shared by every optimizer and scheduler.

Each check raises before anything is modified and names the argument, the value and what was expected.
Each returns the value as a plain Python ``bool`` / ``int`` / ``float`` / ``str``: numpy scalars, 0-d
numpy arrays and 0-d tensors are read into the Python value they hold, so what an optimizer stores can
be saved and loaded back with ``torch.load(weights_only=True)``, which refuses numpy objects.
"""
from __future__ import annotations

import itertools
import math
import numbers
import operator

import numpy as np
import torch

__all__ = [
    "plain", "check_number", "check_nonnegative", "check_unit_interval", "check_positive_int",
    "check_bool", "check_optional_clip", "check_choice", "check_tensor_pair", "check_distinct_weights",
]


def plain(name: str, value, expected: str):
    """``value`` as a plain Python object: numpy scalars, 0-d numpy arrays and 0-d tensors give the Python
    number (or bool, str) they hold; anything else is returned unchanged, for the caller to check.

    An array with dimensions is refused even with one element: numpy deprecates reading a number out of
    it (``float(np.array([0.1]))``), and a shape where a number is expected is usually a mistake.
    """
    if isinstance(value, (np.ndarray, torch.Tensor)):
        if value.ndim != 0:
            raise ValueError(f"{name}={value!r} is invalid: expected {expected}, got "
                             f"{'a tensor' if isinstance(value, torch.Tensor) else 'an array'} of shape "
                             f"{tuple(value.shape)} (only a 0-d array or tensor holds one value)")
        value = value.item()
    if isinstance(value, np.generic):
        out = value.item()
        # np.longdouble (and float96/128) hand themselves back: read them as the nearest float.
        value = float(out) if isinstance(out, np.floating) else out
    return value


def _finite(value) -> bool:
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an int beyond float's range
        return False


def check_number(name: str, value, *, allow_none: bool = False) -> int | float | None:
    """A finite real number (bools rejected), or None when ``allow_none``: an ``int`` for an integral value
    (``np.int64(3)`` too), a ``float`` for any other (``np.float32``, ``fractions.Fraction``...)."""
    if value is None and allow_none:
        return None
    expected = "a finite real number" + (" or None" if allow_none else "")
    number = plain(name, value, expected)
    if isinstance(number, bool) or not isinstance(number, numbers.Real) or not _finite(number):
        raise ValueError(f"{name}={value!r} is invalid: expected {expected}")
    return int(number) if isinstance(number, numbers.Integral) else float(number)


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


def check_positive_int(name: str, value, *, minimum: int = 1) -> int:
    """An integer (a Python ``int`` back; bools and integral floats rejected) >= ``minimum``."""
    number = plain(name, value, f"an integer >= {minimum}")
    if isinstance(number, bool) or not isinstance(number, numbers.Integral) or number < minimum:
        raise ValueError(f"{name}={value!r} is invalid: expected an integer >= {minimum}")
    return int(number)


def check_bool(name: str, value) -> bool:
    """A boolean flag: ``True`` / ``False`` (``np.True_``, a 0-d bool array or tensor, and the integers 0
    and 1 too, as MXNet's operators take them). A string is refused: ``bool('False')`` is True."""
    flag = plain(name, value, "a bool")
    if isinstance(flag, bool):
        return flag
    if isinstance(flag, numbers.Integral) and flag in (0, 1):
        return bool(flag)
    raise TypeError(f"{name}={value!r} is invalid: expected a bool (True or False)")


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
    """One of ``choices`` (an ``np.str_`` is returned as a plain ``str``)."""
    expected = f"one of {', '.join(map(repr, choices))}"
    choice = plain(name, value, expected)
    if choice not in choices:
        raise ValueError(f"{name}={value!r} is invalid: expected {expected}")
    return choice


def check_tensor_pair(index, weight, grad) -> None:
    """A gradient must match its weight: floating weight, dense grad of the same shape, dtype, device."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight for index {index!r} is a {type(weight).__name__}: expected a torch.Tensor")
    if not isinstance(grad, torch.Tensor):
        raise TypeError(f"grad for index {index!r} is a {type(grad).__name__}: expected a torch.Tensor")
    if not weight.is_floating_point():
        raise TypeError(f"weight for index {index!r} has dtype {weight.dtype}: expected a floating-point tensor")
    if grad.layout == torch.sparse_coo:
        return check_row_sparse(index, weight, grad)
    if grad.layout != torch.strided:
        raise TypeError(f"grad for index {index!r} has layout {grad.layout}: expected a dense (strided) gradient "
                        "or a row-sparse one (torch.sparse_coo with sparse_dim 1)")
    if grad.shape != weight.shape:
        raise ValueError(f"grad for index {index!r} has shape {tuple(grad.shape)}: expected the weight's "
                         f"shape {tuple(weight.shape)}")
    _check_dtype_device(index, weight, grad)


def plain_pairs(weights, grads):
    """:func:`check_tensor_pair`'s common case for every pair at once, in C-level maps (no Python loop body per
    pair): tensors, floating weights, dense gradients of their weights' dtypes, shapes and devices. The
    weights' ``(dtype, shape, device)``s, or None where a pair is not plain (ask :func:`check_tensor_pair`,
    which names what is wrong or passes a row-sparse gradient)."""
    tensor = itertools.repeat(torch.Tensor)
    if not (all(map(isinstance, weights, tensor)) and all(map(isinstance, grads, tensor))
            and all(map(operator.is_, map(_LAYOUT, grads), itertools.repeat(torch.strided)))):
        return None
    dtypes, shapes, devices = list(map(_DTYPE, weights)), list(map(_SHAPE, weights)), list(map(_DEVICE, weights))
    if set(dtypes) <= _FLOATING and list(map(_DTYPE, grads)) == dtypes and list(map(_SHAPE, grads)) == shapes \
            and list(map(_DEVICE, grads)) == devices:
        return list(zip(dtypes, shapes, devices))
    return None


#: The floating dtypes of this torch (``torch.Tensor.is_floating_point``'s).
_FLOATING = frozenset(d for d in vars(torch).values() if isinstance(d, torch.dtype) and d.is_floating_point)


def _check_dtype_device(index, weight, grad) -> None:
    if grad.dtype != weight.dtype:
        raise TypeError(f"grad for index {index!r} has dtype {grad.dtype}: expected the weight's dtype {weight.dtype}")
    if grad.device != weight.device:
        raise ValueError(f"grad for index {index!r} is on {grad.device}: expected the weight's device {weight.device}")


def check_row_sparse(index, weight, grad) -> None:
    """A row-sparse gradient: a ``torch.sparse_coo`` tensor with ``sparse_dim == 1`` over the rows of a dense
    weight (what ``nn.Embedding(sparse=True)`` gives), its rows in range, its dense part of the weight's row
    shape, in the weight's dtype and on its device. Duplicated rows are allowed (they are summed)."""
    if weight.layout != torch.strided:
        raise TypeError(f"weight for index {index!r} has layout {weight.layout}: expected a dense (strided) "
                        "weight for a row-sparse gradient")
    if grad.sparse_dim() != 1:
        raise TypeError(f"grad for index {index!r} is sparse with sparse_dim {grad.sparse_dim()}: expected a "
                         "row-sparse gradient (sparse_dim 1, whole rows of the weight), e.g. from "
                         "nn.Embedding(sparse=True); pass grad.to_dense() otherwise")
    if weight.dim() == 0 or tuple(grad.shape[1:]) != tuple(weight.shape[1:]):
        raise ValueError(f"grad for index {index!r} has rows of shape {tuple(grad.shape[1:])}: expected the "
                         f"weight's row shape {tuple(weight.shape[1:])} (weight shape {tuple(weight.shape)})")
    if grad.shape[0] != weight.shape[0]:
        raise ValueError(f"grad for index {index!r} has shape {tuple(grad.shape)}: expected the weight's "
                         f"shape {tuple(weight.shape)}")
    _check_dtype_device(index, weight, grad)
    rows = grad._indices()[0]
    if rows.numel():  # torch checks a COO tensor's indices against its size only when asked to
        lo, hi = int(rows.min()), int(rows.max())
        if lo < 0 or hi >= weight.shape[0]:
            bad = lo if lo < 0 else hi
            raise ValueError(f"grad for index {index!r} has row {bad} out of range: expected rows in "
                             f"[0, {weight.shape[0]}) of the weight")


def check_distinct_weights(indices, weights) -> None:
    """One list call updates each parameter once: no index twice, and no two weights sharing memory (the
    same tensor, or overlapping views of one buffer), which would be stepped twice, or once from a stale
    read, depending on the path. Views of one buffer that do not overlap are distinct parameters.
    """
    if _distinct_fast(indices, weights):
        return
    first = {}
    for pos, index in enumerate(indices):
        try:
            seen = first.setdefault(index, pos)
        except TypeError:  # an unhashable index is not this check's to refuse
            continue
        if seen != pos:
            raise ValueError(f"index {indices[seen]!r} is repeated at positions {seen} and {pos} of the list: "
                             "expected each index once per call (one update per parameter)")
    spans = []  # the bytes each weight covers, per device: [first, last + 1) of its elements
    for pos, w in enumerate(weights):
        if not isinstance(w, torch.Tensor) or w.layout != torch.strided or w.is_meta:
            continue
        n = w.numel()
        if n == 0:
            continue
        extent = n if w.is_contiguous() else 1 + sum((k - 1) * st for k, st in zip(w.shape, w.stride()))
        start = w.data_ptr()
        spans.append((str(w.device), start, start + extent * w.element_size(), pos))
    spans.sort()
    for (dev_a, _, end_a, pos_a), (dev_b, start_b, _, pos_b) in zip(spans, spans[1:]):
        if dev_a == dev_b and start_b < end_a:
            a, b = sorted((pos_a, pos_b))
            what = "is the same tensor as" if weights[a] is weights[b] else "shares memory with"
            raise ValueError(f"weight for index {indices[b]!r} (position {b}) {what} the weight for index "
                             f"{indices[a]!r} (position {a}): expected distinct, non-overlapping weights in "
                             "one list call")


def _distinct_fast(indices, weights) -> bool:
    """True when :func:`check_distinct_weights` has nothing to say, found without a Python loop body per weight
    in the common case (hashable distinct indices; contiguous tensors on one device); False: ask the full check
    (which names the culprits, or finds nothing)."""
    try:
        if len(set(indices)) != len(indices):
            return False
    except TypeError:
        return False
    if len(weights) < 2:
        return True
    if not all(map(isinstance, weights, itertools.repeat(torch.Tensor))) or \
            not all(map(torch.Tensor.is_contiguous, weights)):
        return False
    devices = set(map(_DEVICE, weights))
    if len(devices) != 1 or next(iter(devices)).type == "meta" or \
            not all(map(operator.is_, map(_LAYOUT, weights), itertools.repeat(torch.strided))):
        return False
    spans = sorted((start, start + n * size) for start, n, size in zip(
        map(torch.Tensor.data_ptr, weights), map(torch.Tensor.numel, weights), map(torch.Tensor.element_size, weights))
        if n)
    return all(map(operator.le, (end for _, end in spans), (start for start, _ in spans[1:])))


_DEVICE, _LAYOUT = operator.attrgetter("device"), operator.attrgetter("layout")
_DTYPE, _SHAPE = operator.attrgetter("dtype"), operator.attrgetter("shape")
