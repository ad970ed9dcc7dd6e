"""optzoo: MXNet 1.9.1's optimizer system, with its exact numbers, on PyTorch tensors."""
from . import kvstore, lr_scheduler, optimizer
from . import torch  # noqa: F401  (optzoo.torch: the torch.optim.Optimizer face)
from . import ddp  # noqa: F401  (optzoo.ddp: DDP comm hooks, 2-bit and Signum's vote)
from .optimizer import Optimizer, create, get_updater, list_optimizers, register
from .trainer import Trainer

__version__ = "0.1.0"

__all__ = ["optimizer", "lr_scheduler", "kvstore", "torch", "ddp", "Trainer", "Optimizer", "create", "register", "list_optimizers",
           "get_updater", "__version__"]
