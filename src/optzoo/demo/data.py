"""The 8x8 handwritten digits that ship with optzoo (``optzoo/data/digits.npz``), as train and test tensors.

The data: 1797 images of 8x8 pixels with values 0..16 and their labels 0..9, the test set of the UCI ML
"Optical Recognition of Handwritten Digits" data set (E. Alpaydin, C. Kaynak, 1998; CC BY 4.0), as bundled
with scikit-learn 1.9.1. Provenance and conversion: ``optzoo/data/README.md``. Nothing is downloaded.
"""
from __future__ import annotations

import dataclasses
from importlib import resources

import numpy as np
import torch

__all__ = ["Digits", "load_digits", "split"]


def load_digits():
    """``(images, labels)`` as numpy arrays: uint8 of shape (1797, 8, 8) with values 0..16, and uint8 (1797,)."""
    with resources.files("optzoo").joinpath("data", "digits.npz").open("rb") as f:
        blob = np.load(f)
        return blob["images"], blob["labels"]


@dataclasses.dataclass
class Digits:
    """A train/test split: inputs are flattened to 64 features scaled to [0, 1]; labels are int64."""
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    def to(self, device) -> "Digits":
        return Digits(*(t.to(device) for t in dataclasses.astuple(self)))


def split(seed: int = 0, test_fraction: float = 0.2) -> Digits:
    """Shuffle with ``seed`` and hold out ``test_fraction`` of the images (360 of 1797 by default)."""
    images, labels = load_digits()
    x = torch.from_numpy(images.reshape(len(images), 64).astype(np.float32) / 16.0)
    y = torch.from_numpy(labels.astype(np.int64))
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = round(len(x) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return Digits(x[train], y[train], x[test], y[test])
