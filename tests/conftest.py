"""Fixtures shared by several test files."""
import pytest
import torch

from specs import SPECS


@pytest.fixture
def no_noise(monkeypatch):
    """Stochastic optimizers (spec flag "stochastic") draw no noise: runs compare exactly (the noise is
    tested apart)."""
    from optzoo import optimizer
    for spec in SPECS:
        if "stochastic" in spec.flags:
            monkeypatch.setattr(optimizer.registry.get_record(spec.name).cls, "_noise",
                                lambda self, w, lr: torch.zeros_like(w))
