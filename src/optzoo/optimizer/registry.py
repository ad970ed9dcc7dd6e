"""The optimizer registry: one record per optimizer, looked up by case-insensitive name."""
from __future__ import annotations

import dataclasses
import inspect
import warnings

__all__ = ["OptimizerRecord", "register", "create", "list_optimizers", "get_record", "records"]


@dataclasses.dataclass(frozen=True)
class OptimizerRecord:
    """What the registry knows of one optimizer."""
    name: str
    cls: type
    aliases: tuple = ()
    description: str = ""
    capabilities: frozenset = frozenset()

    def defaults(self) -> dict:
        """The constructor's own keyword defaults (the base class's are shared by all)."""
        out = {}
        for klass in self.cls.__mro__:
            if klass.__name__ == "Optimizer":
                break
            if "__init__" not in klass.__dict__:
                continue
            for p in inspect.signature(klass.__init__).parameters.values():
                if p.default is not inspect.Parameter.empty and p.name not in out:
                    out[p.name] = p.default
        return out


_RECORDS: dict[str, OptimizerRecord] = {}   # canonical name -> record
_NAMES: dict[str, str] = {}                  # canonical name or alias -> canonical name


def _first_line(doc):
    for line in (doc or "").strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


def register(klass=None, *, name=None, aliases=(), description=None):
    """Register an optimizer class under ``klass.__name__.lower()`` (usable as a bare ``@register``).

    Re-registering a name warns and replaces it, as MXNet does.
    """
    def _register(cls):
        from .base import Optimizer
        if not (isinstance(cls, type) and issubclass(cls, Optimizer)):
            raise TypeError(f"register({cls!r}): expected a subclass of optzoo.optimizer.Optimizer")
        canonical = (name or cls.__name__).lower()
        if canonical in _NAMES:
            old = _RECORDS[_NAMES[canonical]].cls
            warnings.warn(f"WARNING: New optimizer {cls.__module__}.{cls.__name__} is overriding existing "
                          f"optimizer {old.__module__}.{old.__name__}", UserWarning, stacklevel=3)
            if _NAMES[canonical] == canonical:
                for alias in _RECORDS[canonical].aliases:
                    _NAMES.pop(alias, None)
        # "sparse": the class takes row-sparse gradients (it says how, by overriding sparse_mode)
        sparse = {"sparse"} if cls.sparse_mode is not Optimizer.sparse_mode else set()
        record = OptimizerRecord(canonical, cls, tuple(a.lower() for a in aliases),
                                 description or _first_line(cls.__doc__), frozenset(cls.capabilities) | sparse)
        _RECORDS[canonical] = record
        for key in (canonical, *record.aliases):
            _NAMES[key] = canonical
        return cls

    return _register(klass) if klass is not None else _register


def get_record(name: str) -> OptimizerRecord:
    """The record of a registered name or alias (case-insensitive)."""
    if not isinstance(name, str):
        raise TypeError(f"optimizer name {name!r} is invalid: expected a string")
    key = name.lower()
    if key not in _NAMES:
        raise ValueError(f"Cannot find optimizer {name!r}: expected one of {', '.join(sorted(_NAMES))}")
    return _RECORDS[_NAMES[key]]


def create(name, **kwargs):
    """Create an optimizer by registered name (case-insensitive), e.g. ``create('adam', learning_rate=0.01)``."""
    return get_record(name).cls(**kwargs)


def list_optimizers() -> list:
    """Registered canonical names, sorted."""
    return sorted(_RECORDS)


def records() -> list:
    """Every registration record, sorted by name."""
    return [_RECORDS[n] for n in sorted(_RECORDS)]
