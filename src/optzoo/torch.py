"""The ``torch.optim.Optimizer`` face of every registered optimizer.

``optzoo.torch.<Name>`` exists for every registered optimizer (custom ones too, with no extra code),
under its MXNet class name, and ``optzoo.torch.create(name, params, **kwargs)`` builds one by name::

    opt = optzoo.torch.FTML(model.parameters(), lr=1e-3, beta1=0.6)
    opt = optzoo.torch.create('lamb', model.parameters(), learning_rate=1e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.01, total_steps=1000)

Hyperparameters use MXNet's names, with torch's accepted as aliases: ``lr`` (``learning_rate``),
``weight_decay`` (``wd``), ``betas`` (``beta1``, ``beta2``). Param groups store the torch names, so
torch's schedulers (which write ``group['lr']``, and ``group['betas']`` or ``group['momentum']``) take
effect at the next step. ``rescale_grad`` defaults to 1. The math is the MXNet-style optimizer's own:
each param group drives one instance of it, so both faces give the same numbers.

Not accepted here: ``lr_scheduler`` (use torch's schedulers), ``param_idx2name``, ``param_dict`` and
``sym`` (use param groups for per-parameter hyperparameters).
"""
from __future__ import annotations

import torch as _torch

from .optimizer import _tree
from .optimizer import registry as _registry
from .optimizer.engine import Runner
from .optimizer.updater import dump_optimizer, load_optimizer

__all__ = ["OptzooOptimizer", "create"]

_TORCH_NAMES = {"learning_rate": "lr", "wd": "weight_decay"}
_REJECTED = ("lr_scheduler", "param_idx2name", "param_dict", "sym")
_FORMAT = "optzoo.torch/1"


class OptzooOptimizer(_torch.optim.Optimizer):
    """Base of the generated ``optzoo.torch.<Name>`` classes; ``optimizer_class`` is the MXNet-style class."""

    optimizer_class = None

    def __init__(self, params, fused=None, **kwargs):
        if self.optimizer_class is None:
            raise TypeError("use optzoo.torch.<Name> or optzoo.torch.create(name, params, ...)")
        if fused not in (None, False, True):
            raise ValueError(f"fused={fused!r} is invalid: expected None (fastest path without compilation), "
                             "True (compiled fused kernels) or False (the reference path)")
        self.fused = fused
        defaults = self._defaults()
        for key, value in _to_group_keys(type(self).__name__, kwargs, defaults).items():
            if key not in defaults:
                raise TypeError(f"{type(self).__name__}() got an unexpected keyword argument {key!r}")
            defaults[key] = value
        self._inner = []          # one MXNet-style optimizer per param group
        self._inner_kwargs = []
        self._runners = []        # per group: the fast path's buckets (built at the first step)
        super().__init__(params, defaults)

    @classmethod
    def _defaults(cls) -> dict:
        record = next(r for r in _registry.records() if r.cls is cls.optimizer_class)
        mx = {"learning_rate": None, "wd": 0.0, "rescale_grad": 1.0, "clip_gradient": None,
              "multi_precision": False, "begin_num_update": 0}
        mx.update(record.defaults())
        for key in _REJECTED:
            mx.pop(key, None)
        if mx["learning_rate"] is None:
            mx["learning_rate"] = 0.01  # MXNet's default when no scheduler is given
        return _to_group_keys(cls.__name__, mx)

    # ------------------------------------------------------------------ groups
    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            kwargs = self._mx_kwargs(group)
            self._inner.append(self.optimizer_class(**kwargs))
            self._inner_kwargs.append(kwargs)
            self._runners.append(None)
        except Exception:
            self.param_groups.pop()
            raise

    def _mx_kwargs(self, group) -> dict:
        kwargs = {}
        for key in self.defaults:
            value = group[key]
            if key == "betas":
                kwargs["beta1"], kwargs["beta2"] = value
            else:
                kwargs[{"lr": "learning_rate", "weight_decay": "wd"}.get(key, key)] = value
        return kwargs

    def _sync(self, g, group):
        """Carry hyperparameter changes made to a group (by a scheduler or by hand) into its optimizer."""
        kwargs = self._mx_kwargs(group)
        old = self._inner_kwargs[g]
        if kwargs == old:
            return
        inner = self._inner[g]
        changed = {k for k in kwargs if kwargs[k] != old[k]}
        if changed == {"learning_rate"}:
            inner.set_learning_rate(kwargs["learning_rate"])   # the common case: validated, cheap
        else:
            # which attributes depend on the changed hyperparameters: compare two fresh, validated instances
            before, after = self.optimizer_class(**old), self.optimizer_class(**kwargs)
            for attr, value in vars(after).items():
                if attr != "_init_args" and _differs(value, vars(before).get(attr)):
                    setattr(inner, attr, value)
            inner._init_args = after._init_args
        self._inner_kwargs[g] = kwargs

    # ------------------------------------------------------------------ stepping
    @_torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter that has a gradient; returns ``closure()``'s loss if given."""
        loss = None
        if closure is not None:
            with _torch.enable_grad():
                loss = closure()
        base = 0
        for g, group in enumerate(self.param_groups):
            self._sync(g, group)
            inner, params = self._inner[g], group["params"]
            if self.fused is not False and self._runners[g] is None:
                self._runners[g] = Runner(inner, self.fused)
                views = self._runners[g].build(range(base, base + len(params)), params,
                                               [self.state[p].get("mx_state") for p in params])
                for i, st in views.items():
                    self.state[params[i - base]]["mx_state"] = st
            fresh = {base + k for k, p in enumerate(params) if p.grad is not None}
            done = self._runners[g].step(fresh) if self._runners[g] is not None else set()
            indices, weights, grads, states = [], [], [], []
            for i in sorted(fresh - done):
                p = params[i - base]
                state = self.state[p]
                if "mx_state" not in state:
                    state["mx_state"] = inner.create_state_multi_precision(i, p.detach())
                indices.append(i)
                weights.append(p.detach())
                grads.append(p.grad)
                states.append(state["mx_state"])
            if indices:
                inner.update_multi_precision(indices, weights, grads, states)
            for i in fresh:
                self.state[params[i - base]]["step"] = inner._index_update_count.get(i, 0)
            base += len(params)
        return loss

    # ------------------------------------------------------------------ state dicts
    def state_dict(self):
        """torch's format (``state``, ``param_groups``) plus ``optzoo``: each group's optimizer bookkeeping."""
        sd = super().state_dict()
        sd["state"] = {k: {"step": v.get("step", 0), "mx_state": _tree.detached(v["mx_state"])}
                       for k, v in sd["state"].items()}
        sd["optzoo"] = {"format": _FORMAT, "optimizer": type(self).__name__,
                        "groups": [dump_optimizer(inner) for inner in self._inner]}
        return sd

    def load_state_dict(self, state_dict):
        """Load ``state_dict()`` output; everything is checked first, nothing changes on an error.

        States keep their dtypes (fp32 master copies stay fp32: torch's loader would cast them to the
        parameter dtype).
        """
        meta = state_dict.get("optzoo") if isinstance(state_dict, dict) else None
        name = type(self).__name__
        if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
            raise ValueError(f"state_dict is not an optzoo.torch state dict: expected one from {name}.state_dict()")
        if meta["optimizer"] != name:
            raise ValueError(f"state_dict is from optimizer {meta['optimizer']}: expected one from {name}")
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(f"state_dict has {len(groups)} param groups: this optimizer has {len(self.param_groups)}")
        params = []
        for g, (saved, group) in enumerate(zip(groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"state_dict param group {g} has {len(saved['params'])} parameters: expected "
                                 f"{len(group['params'])}")
            params += list(zip(saved["params"], group["params"], [g] * len(group["params"])))
        inner = [load_optimizer(d) for d in meta["groups"]]
        new_state = {}
        for base, (saved_id, p, g) in enumerate(params):
            if saved_id not in state_dict["state"]:
                continue
            entry = state_dict["state"][saved_id]
            s = inner[g]._adopt_state(base, p, _tree.to_plain(entry["mx_state"]),
                                      f"state_dict state of parameter {base} (group {g})")
            new_state[p] = {"step": entry["step"], "mx_state": s}
        # all checked: commit
        for saved, group in zip(groups, self.param_groups):
            group.update({k: v for k, v in saved.items() if k != "params"})
        self.state.clear()
        self.state.update(new_state)
        self._inner = inner
        self._runners = [None] * len(inner)   # rebuilt at the next step, from the loaded states
        self._inner_kwargs = [self._mx_kwargs(group) for group in self.param_groups]


def _differs(a, b) -> bool:
    if isinstance(a, _torch.Tensor) or isinstance(b, _torch.Tensor):
        return a is not b
    try:
        return bool(a != b)
    except Exception:  # pragma: no cover - exotic attribute types
        return True


def _to_group_keys(cls_name, kwargs, defaults=None) -> dict:
    """MXNet names -> group keys (torch's lr / weight_decay / betas); reject both spellings at once.

    A lone ``beta1`` or ``beta2`` is completed from ``defaults['betas']``."""
    out = {}
    for key, value in kwargs.items():
        if key in _REJECTED:
            raise TypeError(f"{cls_name}(): {key!r} is not supported by the torch face: use param groups and "
                            "torch.optim.lr_scheduler")
        out_key = _TORCH_NAMES.get(key, key)
        if out_key in out:
            raise TypeError(f"{cls_name}() got both {key!r} and its alias {out_key!r}")
        out[out_key] = value
    if "beta1" in out or "beta2" in out or "betas" in out:
        if "betas" in out and ("beta1" in out or "beta2" in out):
            raise TypeError(f"{cls_name}() got both 'betas' and 'beta1'/'beta2'")
        if "betas" not in out:
            b1, b2 = (defaults or {}).get("betas", (None, None))
            out["betas"] = (out.pop("beta1", b1), out.pop("beta2", b2))
        elif not (isinstance(out["betas"], (tuple, list)) and len(out["betas"]) == 2):
            raise ValueError(f"betas={out['betas']!r} is invalid: expected a pair (beta1, beta2)")
        else:
            out["betas"] = tuple(out["betas"])
    return out


_CLASSES: dict = {}


def _face(record):
    cls = _CLASSES.get(record.cls)
    if cls is None:
        doc = (f"``torch.optim.Optimizer`` face of :class:`{record.cls.__module__}.{record.cls.__name__}`.\n\n"
               f"{record.description}\n\n" + (record.cls.__doc__ or ""))
        cls = type(record.cls.__name__, (OptzooOptimizer,), {"optimizer_class": record.cls, "__doc__": doc,
                                                             "__module__": __name__})
        _CLASSES[record.cls] = cls
    return cls


def create(name, params, **kwargs) -> OptzooOptimizer:
    """The torch face of a registered optimizer, by (case-insensitive) name."""
    return _face(_registry.get_record(name))(params, **kwargs)


def __getattr__(attr):
    for record in _registry.records():
        if record.cls.__name__ == attr:
            return _face(record)
    raise AttributeError(f"module 'optzoo.torch' has no attribute {attr!r}")


def __dir__():
    return sorted(set(globals()) | {r.cls.__name__ for r in _registry.records()})
