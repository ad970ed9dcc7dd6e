"""The benchmark's workloads, the optimizers' settings, and the bytes each step must move.

Workloads (full size; ``scale`` shrinks them for smoke runs):

==========  ==========================================================  ============  =====
key         what                                                        elements      dtype
==========  ==========================================================  ============  =====
single      (i) one 4096 x 4096 tensor                                  16,777,216    fp32
resnet50    (ii) ResNet-50's 161 parameter shapes                       25,557,032    fp32
small       (iii) 2,000 tensors of 1,024 elements                       2,048,000     fp32
fp16        (iv) (i) in fp16, ``multi_precision=True`` (fp32 master)    16,777,216    fp16
loaded      (v) (i) with a CPU-bound process on every core alongside    16,777,216    fp32
scheduled   (vii) (iii) with a new lr at every step (LambdaLR)           2,048,000     fp32
==========  ==========================================================  ============  =====

The row-sparse workload ``embedding`` ((vi): a 10,000,000 x 64 fp32 table, 4,096 rows touched per step) has its
own measurement, lazy step against dense step and torch's sparse optimizers: :mod:`optzoo.bench.sparse`.

``loaded`` is the "shared machine": the same tensor as (i), measured while :func:`optzoo.bench.load.busy_cores`
keeps one busy-loop process per core running, torch's fused Adam measured under the same load beside it.

``scheduled`` is how most training runs: (iii)'s tensors, each optimizer (and torch's fused Adam beside it) stepped
with a ``torch.optim.lr_scheduler.LambdaLR`` stepped after it (a warm-up then a decay: a new lr at every step), the
scheduler's step included in the time.

Bytes moved per element (the "effective" traffic of one step, the least an ideal kernel could move):
the weight read and written, the gradient read, and every state tensor read and written, each at
its own dtype. Under multi-precision the fp32 master copy is one of the states; the fp16 weight is
still counted read + written (an ideal kernel only writes it: 2 B/elt, under 7% of the total).
States come from the optimizer's own ``create_state_multi_precision`` on meta tensors, so the
count follows the state layout with no per-optimizer table to keep in sync; states smaller than the
weight (GroupAdaGrad's per-row history) count at their own size. Reductions (LARS's and LAMB's
norms) and random numbers (SGLD) re-read or compute without adding to this count.
"""
from __future__ import annotations

import dataclasses
import math
import warnings

import torch

from ..optimizer import _tree
from ..optimizer import registry

__all__ = ["Workload", "WORKLOADS", "RESNET50_TENSORS", "RESNET50_ELEMENTS", "SETTINGS", "resnet50_shapes",
           "make_workload", "bytes_moved", "bytes_per_element", "param_shape", "settings_for"]

RESNET50_TENSORS = 161
RESNET50_ELEMENTS = 25_557_032

#: Hyperparameters the benchmark uses (MXNet names; the rest are MXNet's defaults). Momentum is set
#: where MXNet's default of 0 would leave the optimizer without state. DCASGD keeps momentum 0:
#: MXNet 1.9.1 raises for momentum > 0. No weight decay: where it enters differs from torch.optim.
SETTINGS = {
    "sgd": {"momentum": 0.9},
    "nag": {"momentum": 0.9},
    "lbsgd": {"momentum": 0.9},
    "lars": {"momentum": 0.9},
}


def settings_for(name: str, overrides: dict | None = None) -> dict:
    """The benchmark's hyperparameters of a registered optimizer, with ``overrides`` applied."""
    return {**SETTINGS.get(registry.get_record(name).name, {}), **(overrides or {})}


@dataclasses.dataclass(frozen=True)
class Workload:
    key: str
    label: str
    shapes: tuple
    dtype: torch.dtype = torch.float32
    multi_precision: bool = False
    loaded: bool = False  # measured with a busy process on every core (the "shared machine")
    scheduled: bool = False  # a LambdaLR stepped after every step, on both sides

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).replace("torch.", "")

    def describe(self) -> str:
        mp = ", multi_precision" if self.multi_precision else ""
        load = ", a busy process on every core" if self.loaded else ""
        load += ", a new lr at every step (LambdaLR)" if self.scheduled else ""
        n = len(self.shapes)
        return (f"{self.label}: {n:,} tensor{'s' if n > 1 else ''}, {self.numel:,} elements, "
                f"{self.dtype_name}{mp}{load}")


def resnet50_shapes() -> list:
    """ResNet-50's parameter shapes in ``torchvision.models.resnet50().parameters()`` order.

    conv1 7x7/64 + bn, four stages of [3, 4, 6, 3] bottlenecks (1x1, 3x3, 1x1 convs, each with a bn;
    expansion 4; the first block of a stage has a 1x1 downsample conv + bn), fc 2048 -> 1000 with bias.
    Convs have no bias; a bn has weight and bias.
    """
    shapes = [(64, 3, 7, 7), (64,), (64,)]
    inplanes = 64
    for planes, blocks in zip((64, 128, 256, 512), (3, 4, 6, 3)):
        for block in range(blocks):
            out = planes * 4
            shapes += [(planes, inplanes, 1, 1), (planes,), (planes,),
                       (planes, planes, 3, 3), (planes,), (planes,),
                       (out, planes, 1, 1), (out,), (out,)]
            if block == 0:
                shapes += [(out, inplanes, 1, 1), (out,), (out,)]
            inplanes = out
    shapes += [(1000, 2048), (1000,)]
    assert len(shapes) == RESNET50_TENSORS, len(shapes)
    assert sum(math.prod(s) for s in shapes) == RESNET50_ELEMENTS
    return shapes


def _shrink(shape, scale):
    """``shape`` with about ``scale`` times its elements (leading dimensions shrink first; >= 1 element)."""
    if scale >= 1:
        return tuple(shape)
    target = max(1, round(math.prod(shape) * scale))
    dims = list(shape)
    for i in range(len(dims)):
        if math.prod(dims) <= target:
            break
        rest = math.prod(dims) // dims[i]
        dims[i] = max(1, target // rest)
    return tuple(dims)


def make_workload(key: str, scale: float = 1.0) -> Workload:
    """One workload at ``scale`` times its full size ((iii) scales both its count and its size by sqrt(scale))."""
    if not (isinstance(scale, (int, float)) and 0 < scale <= 1):
        raise ValueError(f"scale={scale!r} is invalid: expected a number in (0, 1]")
    if key == "single":
        return Workload(key, "(i) one tensor", (_shrink((4096, 4096), scale),))
    if key == "resnet50":
        return Workload(key, "(ii) ResNet-50", tuple(_shrink(s, scale) for s in resnet50_shapes()))
    if key in ("small", "scheduled"):
        root = math.sqrt(scale)
        count, size = max(2, round(2000 * root)), max(1, round(1024 * root))
        if key == "scheduled":
            return Workload(key, "(vii) many small, scheduled", ((size,),) * count, scheduled=True)
        return Workload(key, "(iii) many small", ((size,),) * count)
    if key == "fp16":
        return Workload(key, "(iv) fp16 + multi_precision", (_shrink((4096, 4096), scale),), torch.float16, True)
    if key == "loaded":
        return Workload(key, "(v) shared machine", (_shrink((4096, 4096), scale),), loaded=True)
    raise ValueError(f"workload {key!r} is unknown: expected one of {', '.join(WORKLOADS)}")


WORKLOADS = ("single", "resnet50", "small", "fp16", "loaded", "scheduled")


def param_shape(name: str, shape) -> tuple:
    """The shape a parameter gets for optimizer ``name``: GroupAdaGrad (2-D only) sees ``(rows, rest)``,
    1-D shapes as one row."""
    if registry.get_record(name).name != "groupadagrad" or len(shape) == 2:
        return tuple(shape)
    if len(shape) == 1:
        return (1, shape[0])
    return (shape[0], math.prod(shape[1:]))


def bytes_moved(name: str, workload: Workload, settings: dict | None = None) -> int:
    """Bytes one step of ``name`` must move over ``workload`` (see the module docstring)."""
    opt = registry.create(name, multi_precision=workload.multi_precision, **settings_for(name, settings))
    size = torch.empty((), dtype=workload.dtype).element_size()
    total = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for index, shape in enumerate(workload.shapes):
            weight = torch.empty(param_shape(name, shape), dtype=workload.dtype, device="meta")
            total += 3 * weight.numel() * size                     # weight read + write, gradient read
            state = opt.create_state_multi_precision(index, weight)
            total += sum(2 * leaf.numel() * leaf.element_size() for leaf in _tree.leaves(state))
    return total


def bytes_per_element(name: str, dtype=torch.float32, multi_precision=False, shape=(4096, 4096),
                      settings: dict | None = None) -> float:
    """Bytes moved per weight element by one step of ``name`` on one tensor of ``shape``."""
    workload = Workload("custom", "custom", (tuple(shape),), dtype, multi_precision)
    return bytes_moved(name, workload, settings) / workload.numel
