"""THE spec table: one entry per registered optimizer, driving every generic test.

Pure data (no torch, no optzoo import), so the MXNet 1.9.1 fixture recorder
(``tests/fixtures/record_mxnet.py``, run in the side venv) reads the very same grid.

A fixture *case* is one optimizer configuration run for ``len(SEQUENCE)`` updates on two parameters
(indices 0 and 1, interleaved as ``SEQUENCE`` says), described by a JSON-able dict:

    {"id", "optimizer", "kwargs", "scheduler": None | {"class", "kwargs"},
     "lr_mult": [[key, value], ...], "wd_mult": [[key, value], ...],
     "param_dict": [[index, lr_mult, wd_mult], ...], "dtype", "shapes", "sequence", "seed"}

Keys of ``lr_mult`` / ``wd_mult`` are ints (indices) or strings (names from ``param_idx2name``, whose
keys are written as strings in JSON and turned back into ints by ``load_case``).

An *aggregated* case (``aggregated_cases()``, for specs flagged "aggregated") is the same dict with six
parameters (``AGG_SHAPES``) and, instead of ``sequence``, ``calls``: per step, the index list that one
Updater call hands over (MXNet's Updater cuts it into update calls of ``aggregate_num`` indices).
"""
from __future__ import annotations

import dataclasses
import json

#: Index order of the updates of a case: 20 updates of each index, interleaved irregularly, so update
#: counts differ between the indices at times (num_update is their max) and Nadam's shared schedule moves.
SEQUENCE = [0, 1, 1, 0, 0, 0, 1, 0, 1, 1, 0, 1, 0, 0, 1, 1, 1, 0, 0, 1,
            0, 1, 0, 1, 1, 0, 0, 1, 0, 0, 1, 1, 0, 1, 0, 1, 1, 0, 0, 1]
SHAPES = [[3, 4], [5]]
SCHED_LR = 0.05

#: Options shared by every optimizer: name -> (base-class kwargs, extras). ``wd`` entries are dropped
#: for optimizers flagged "no_wd".
COMMON = {
    "plain": {},
    "wd_rescale": {"kwargs": {"wd": 0.05, "rescale_grad": 0.5}},
    "clip": {"kwargs": {"clip_gradient": 0.3, "rescale_grad": 2.0, "wd": 0.02}},
    "mult": {"kwargs": {"wd": 0.1}, "lr_mult": [[0, 0.5]], "wd_mult": [[1, 2.0]]},
    "names": {"kwargs": {"wd": 0.1, "param_idx2name": {0: "fc_weight", 1: "fc_bias"}},
              "lr_mult": [["fc_bias", 2.0]], "wd_mult": [["fc_weight", 0.5]]},
    "param_dict": {"kwargs": {"wd": 0.05}, "param_dict": [[0, 0.3, 2.0], [1, 1.5, 0.0]]},
    "begin": {"kwargs": {"begin_num_update": 10, "wd": 0.01}},
    "factor": {"scheduler": {"class": "FactorScheduler", "kwargs": {
        "step": 5, "factor": 0.5, "stop_factor_lr": 1e-3, "base_lr": SCHED_LR, "warmup_steps": 3,
        "warmup_begin_lr": 0.01, "warmup_mode": "linear"}}},
    "multifactor": {"scheduler": {"class": "MultiFactorScheduler", "kwargs": {
        "step": [4, 9, 15], "factor": 0.3, "base_lr": SCHED_LR, "warmup_steps": 2,
        "warmup_begin_lr": 0.02, "warmup_mode": "constant"}}},
    "poly": {"scheduler": {"class": "PolyScheduler", "kwargs": {
        "max_update": 16, "base_lr": SCHED_LR, "pwr": 2, "final_lr": 0.001, "warmup_steps": 4,
        "warmup_begin_lr": 0.0, "warmup_mode": "linear"}}},
    # an explicit learning_rate that differs from the scheduler's base_lr: MXNet overwrites base_lr only
    "cosine": {"kwargs": {"learning_rate": 0.03}, "scheduler": {"class": "CosineScheduler", "kwargs": {
        "max_update": 25, "base_lr": SCHED_LR, "final_lr": 0.002, "warmup_steps": 5,
        "warmup_begin_lr": 0.005, "warmup_mode": "linear"}}},
    "fp16_mp": {"kwargs": {"multi_precision": True, "wd": 0.01}, "dtype": "float16"},
    "fp64": {"kwargs": {"wd": 0.01}, "dtype": "float64"},
}
#: The commons run with every variant after the first (the first variant runs with all of COMMON).
VARIANT_COMMON = ("plain", "clip", "fp16_mp", "cosine")

#: Aggregated cases: six fp32 parameters of mixed shapes, all stepped by one Updater call per step (so
#: SGD and LARS, aggregate_num 4, get calls of 4 + 2 indices; LAMB, 45, one of 6), in index order on even
#: steps and reversed on odd ones, under schedulers that change the lr at every step.
AGG_SHAPES = [[3, 4], [5], [2, 3, 2], [7], [4, 4], [1]]
AGG_STEPS = 10
AGG_CALLS = [list(range(6)) if s % 2 == 0 else list(range(5, -1, -1)) for s in range(AGG_STEPS)]
AGG_COMMON = {
    # biases, gamma and beta inside both calls (LARS: no trust ratio, no weight decay for them)
    "names": {"kwargs": {"wd": 0.01, "rescale_grad": 0.5, "param_idx2name": {
        0: "fc0_weight", 1: "fc0_bias", 2: "conv_weight", 3: "bn_gamma", 4: "fc1_weight", 5: "bn_beta"}},
        "scheduler": {"class": "FactorScheduler", "kwargs": {"step": 1, "factor": 0.8, "base_lr": SCHED_LR}}},
    "clip_mult": {"kwargs": {"wd": 0.02, "clip_gradient": 0.3, "rescale_grad": 2.0},
                  "lr_mult": [[0, 0.5], [4, 2.0]], "wd_mult": [[5, 3.0]],
                  "scheduler": {"class": "PolyScheduler", "kwargs": {
                      "max_update": 12, "base_lr": SCHED_LR, "pwr": 2, "final_lr": 0.001, "warmup_steps": 3,
                      "warmup_begin_lr": 0.01, "warmup_mode": "linear"}}},
    # calls that leave indices out, so one call holds indices of unequal counts: MXNet's aggregated SGD and
    # LARS count the whole call, then read the lr once (LAMB reads per index)
    "uneven": {"kwargs": {"wd": 0.01},
               "scheduler": {"class": "FactorScheduler", "kwargs": {"step": 1, "factor": 0.7, "base_lr": SCHED_LR}},
               "calls": [[0, 1, 2, 3, 4, 5] if s % 3 == 0 else [0, 2, 3, 5] if s % 3 == 1 else [5, 4, 1]
                         for s in range(AGG_STEPS)]},
}


@dataclasses.dataclass(frozen=True)
class Spec:
    """One optimizer's entry.

    variants: optimizer-specific kwargs; the first is combined with every COMMON option, the others
        with VARIANT_COMMON.
    bad: (kwargs, exception name, substring of the message) that the constructor must reject.
    flags: capabilities that generic tests key on, never the name:
        "stochastic"  draws noise (the fixture noise is injected through ``opt._noise``)
        "no_wd"       rejects wd != 0 (GroupAdaGrad)
        "no_count"    does not count updates (Test)
        "no_lr"       never reads the learning rate (AdaDelta)
        "accumulates" may leave a weight unchanged on some calls (LBSGD with batch_scale > 1)
        "fp32_state"  MXNet keeps fp32 states even for fp64 weights, and its kernels then refuse fp64
                      weights (its fp64 fixture case records MXNet's error; optzoo runs it)
        "fp16_norms"  MXNet's aggregated kernel takes per-tensor norms of the fp16 weight/grad under
                      multi-precision (squares in fp16), optzoo of the fp32 master: fp16 cases compare
                      the fp32 tensors within fp16 rounding (and are not bit-exact)
        "fp16_weight_norm" under multi-precision MXNet's aggregated LAMB kernel takes the weight norm
                      of the fp16 weight, optzoo of the fp32 master copy: fp16 cases are not bit-exact
        "fp64_norms"  MXNet's multi_sum_sq adds fp64 squares into an fp32 sum, rounding after every
                      addition, which optzoo does not emulate (it would take a Python loop per element;
                      fp32 is exact): fp64 cases are not bit-exact
        "bucket_norms" per-tensor norms in a compiled fast-path kernel are fp64 row sums, not MXNet's
                      sequential fp32 sums (eager buckets keep MXNet's), and LAMB's u is fp32 math there,
                      not fp64: compiled within 1e-5
        "compiled_row_sums" compiled (fused=True) row sums are fp64 sums rounded to the weight dtype, not
                      MXNet's Kahan sums (within two ulps of the exact sum of nonnegative squares; eager
                      buckets keep MXNet's): compiled within 1e-5
        "moves_on_zero_grad" a zero gradient moves the weights (torch's "no-op on zero grad" does not hold):
                      Adamax divides 0 by 0 (MXNet's u = max(b2*u, |g|) has no epsilon), FTRL sets w from its
                      thresholded z (0 where |z| <= lamda1)
        "fp32_trust_ratio" in fp64 the trust ratio's norms differ from MXNet's by fp64_norms' rounding,
                      which 30 Trainer steps amplify: Trainer fp64 parity within 1e-7 (measured 7.7e-9)
        "aggregated"  MXNet's Updater hands it lists of indices (its aggregate_num > 0: one update call per
                      aggregate_num indices, multi-tensor kernels): aggregated fixture cases, replayed
                      through optzoo's Updater (tests/test_aggregated_parity.py)
    shapes: the two parameters' shapes.
    skip_common: COMMON names that do not apply.
    """
    name: str
    variants: tuple = ({},)
    bad: tuple = ()
    flags: frozenset = frozenset()
    shapes: tuple = tuple(map(tuple, SHAPES))
    skip_common: tuple = ()


def _unit(*names):
    """Bad-input cases for hyperparameters that must lie in [0, 1)."""
    return tuple(c for n in names for c in (({n: 1.0}, "ValueError", n), ({n: -0.1}, "ValueError", n)))


SPECS = [
    Spec("sgd", ({}, {"momentum": 0.9}), bad=_unit("momentum"), flags=frozenset({"aggregated"})),
    Spec("nag", ({}, {"momentum": 0.9}), bad=_unit("momentum")),
    Spec("signum", ({}, {"momentum": 0.8, "wd_lh": 0.01}, {"momentum": 0.0}),
         bad=_unit("momentum") + (({"wd_lh": -1.0}, "ValueError", "wd_lh"),)),
    Spec("lbsgd", ({}, {"momentum": 0.9, "warmup_strategy": "linear", "warmup_epochs": 2, "updates_per_epoch": 4,
                        "batch_scale": 3},
                   {"momentum": 0.5, "warmup_strategy": "power2", "warmup_epochs": 1, "updates_per_epoch": 6,
                    "batch_scale": 2},
                   {"warmup_strategy": "sqrt", "warmup_epochs": 1, "updates_per_epoch": 10, "batch_scale": 4},
                   {"momentum": 0.9, "warmup_strategy": "lars"}),
         bad=_unit("momentum") + (({"warmup_strategy": "cubic"}, "ValueError", "warmup_strategy"),
                                  ({"batch_scale": 0}, "ValueError", "batch_scale")),
         flags=frozenset({"accumulates"})),
    Spec("lars", ({"momentum": 0.9, "eta": 0.01}, {"momentum": 0.8, "eta": 0.001, "eps": 1e-8,
                                                   "momentum_correction": False}),
         bad=_unit("momentum") + (({"eta": -1.0}, "ValueError", "eta"), ({"eps": -1.0}, "ValueError", "eps")),
         flags=frozenset({"aggregated", "fp16_norms", "fp64_norms", "bucket_norms"})),
    Spec("dcasgd", ({}, {"lamda": 0.5}), bad=_unit("momentum") + (({"lamda": -1.0}, "ValueError", "lamda"),)),
    Spec("sgld", ({},), flags=frozenset({"stochastic"})),
    Spec("adagrad", ({}, {"eps": 1e-5}), bad=(({"eps": -1.0}, "ValueError", "eps"),),
         flags=frozenset({"fp32_state"})),
    Spec("rmsprop", ({}, {"centered": True}, {"centered": True, "clip_weights": 0.5},
                     {"gamma1": 0.8, "epsilon": 1e-6}),
         bad=_unit("gamma1", "gamma2") + (({"epsilon": -1.0}, "ValueError", "epsilon"),
                                          ({"clip_weights": -1.0}, "ValueError", "clip_weights")),
         flags=frozenset({"fp32_state"})),
    Spec("adadelta", ({}, {"rho": 0.8, "epsilon": 1e-6}),
         bad=_unit("rho") + (({"epsilon": -1.0}, "ValueError", "epsilon"),), flags=frozenset({"no_lr", "fp32_state"})),
    Spec("adam", ({}, {"beta1": 0.8, "beta2": 0.99, "epsilon": 1e-6}),
         bad=_unit("beta1", "beta2") + (({"epsilon": -1.0}, "ValueError", "epsilon"),)),
    Spec("adamax", ({}, {"beta1": 0.8, "beta2": 0.99}), bad=_unit("beta1", "beta2"),
         flags=frozenset({"moves_on_zero_grad"})),
    Spec("nadam", ({}, {"beta1": 0.8, "schedule_decay": 0.01}),
         bad=_unit("beta1", "beta2") + (({"epsilon": -1.0}, "ValueError", "epsilon"),)),
    Spec("ftrl", ({}, {"lamda1": 0.5, "beta": 0.5}),
         bad=(({"lamda1": -1.0}, "ValueError", "lamda1"), ({"beta": -1.0}, "ValueError", "beta")),
         flags=frozenset({"fp32_state", "moves_on_zero_grad"})),
    Spec("ftml", ({}, {"beta1": 0.7, "beta2": 0.9}),
         bad=_unit("beta1", "beta2") + (({"epsilon": -1.0}, "ValueError", "epsilon"),)),
    Spec("lamb", ({}, {"bias_correction": False}, {"lower_bound": 0.1, "upper_bound": 2.0}),
         bad=_unit("beta1", "beta2") + (({"epsilon": -1.0}, "ValueError", "epsilon"),
                                        ({"lower_bound": -1.0}, "ValueError", "lower_bound")),
         flags=frozenset({"aggregated", "fp32_trust_ratio", "fp16_weight_norm", "fp64_norms", "bucket_norms"})),
    Spec("groupadagrad", ({}, {"eps": 1e-3}), bad=(({"eps": -1.0}, "ValueError", "eps"),
                                                   ({"wd": 0.1}, "ValueError", "wd")),
         flags=frozenset({"no_wd", "fp32_state", "compiled_row_sums"}), shapes=((3, 4), (6, 2))),
    Spec("test", ({},), flags=frozenset({"no_count"})),
]

SPEC_BY_NAME = {s.name: s for s in SPECS}


def _case(spec, vi, variant, common_name):
    common = COMMON[common_name]
    kwargs = dict(common.get("kwargs", {}))
    if "no_wd" in spec.flags:
        kwargs.pop("wd", None)
    kwargs.update(variant)
    wd_mult = [] if "no_wd" in spec.flags else common.get("wd_mult", [])
    return {"id": f"{spec.name}-v{vi}-{common_name}", "optimizer": spec.name, "kwargs": kwargs,
            "scheduler": common.get("scheduler"), "lr_mult": common.get("lr_mult", []), "wd_mult": wd_mult,
            "param_dict": [] if "no_wd" in spec.flags and common.get("param_dict") else common.get("param_dict", []),
            "dtype": common.get("dtype", "float32"), "shapes": [list(s) for s in spec.shapes],
            "sequence": list(SEQUENCE), "seed": 1000 + 17 * vi + sorted(COMMON).index(common_name)}


def cases(spec=None):
    """Every fixture case (of one spec, or of all)."""
    out = []
    for s in ([spec] if spec is not None else SPECS):
        for vi, variant in enumerate(s.variants):
            for common_name in (COMMON if vi == 0 else VARIANT_COMMON):
                if common_name not in s.skip_common:
                    out.append(_case(s, vi, variant, common_name))
    return out


def aggregated_cases():
    """Every aggregated fixture case: each variant of each "aggregated" spec with each AGG_COMMON option."""
    out = []
    for s in SPECS:
        if "aggregated" not in s.flags:
            continue
        for vi, variant in enumerate(s.variants):
            for ci, (common_name, common) in enumerate(AGG_COMMON.items()):
                out.append({"id": f"{s.name}-v{vi}-agg_{common_name}", "optimizer": s.name,
                            "kwargs": {**common.get("kwargs", {}), **variant}, "scheduler": common.get("scheduler"),
                            "lr_mult": common.get("lr_mult", []), "wd_mult": common.get("wd_mult", []),
                            "param_dict": [], "dtype": "float32", "shapes": AGG_SHAPES,
                            "calls": common.get("calls", AGG_CALLS),
                            "seed": 2000 + 17 * vi + ci})
    return out


def load_case(case):
    """A case read back from JSON: restore int keys of param_idx2name."""
    case = json.loads(json.dumps(case))
    names = case["kwargs"].get("param_idx2name")
    if names is not None:
        case["kwargs"]["param_idx2name"] = {int(k): v for k, v in names.items()}
    return case
