"""MXNet 1.9.1's optimizer package on PyTorch tensors: ``create``, ``register``, every optimizer, ``Updater``."""
from .adadelta import AdaDelta
from .adagrad import AdaGrad
from .adam import Adam
from .adamax import Adamax
from .base import Optimizer
from .dcasgd import DCASGD
from .ftml import FTML
from .ftrl import Ftrl
from .group_adagrad import GroupAdaGrad
from .lamb import LAMB
from .lars import LARS
from .lbsgd import LBSGD
from .nadam import Nadam
from .nag import NAG
from .registry import OptimizerRecord, create, get_record, list_optimizers, records, register
from .rmsprop import RMSProp
from .sgd import SGD, ccSGD
from .sgld import SGLD
from .signum import Signum
from .test import Test
from .updater import Updater, get_updater

# MXNet's spellings: ``mx.optimizer.Optimizer.create_optimizer`` / ``Optimizer.register``
Optimizer.create_optimizer = staticmethod(create)
Optimizer.register = staticmethod(register)

__all__ = ["Optimizer", "OptimizerRecord", "Updater", "create", "get_record", "get_updater", "list_optimizers",
           "records", "register",
           "AdaDelta", "AdaGrad", "Adam", "Adamax", "DCASGD", "FTML", "Ftrl", "GroupAdaGrad", "LAMB", "LARS",
           "LBSGD", "NAG", "Nadam", "RMSProp", "SGD", "SGLD", "Signum", "Test", "ccSGD"]
