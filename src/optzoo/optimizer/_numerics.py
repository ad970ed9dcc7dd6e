"""Scalar rounding that MXNet 1.9.1's C++ kernels do, reproduced for parity.

Kernel hyperparameters are fp32 dmlc fields, and expressions like ``1.f - beta`` are evaluated in
float before they meet the tensor: ``1 - 0.999`` is 0.00099998713 there, not 0.001, a 1.3e-5 relative
difference in every second-moment update. Python-implemented MXNet optimizers (Adamax, Nadam, AdaGrad,
AdaDelta, DCASGD, SGLD) compute such scalars in double instead.
"""
import numpy as np

__all__ = ["fp32", "one_minus_fp32"]


def fp32(x: float) -> float:
    """``x`` rounded to float32, as a kernel parameter field holds it."""
    return float(np.float32(x))


def one_minus_fp32(x: float) -> float:
    """``1.f - x`` evaluated in float32, as the kernels compute it."""
    return float(np.float32(1.0) - np.float32(x))
