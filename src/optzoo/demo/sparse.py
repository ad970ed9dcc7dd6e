"""The demo's sparse example: a click-through-style model trained with row-sparse gradients, against the dense
update of the same model.

The data (:func:`make_data`) is generated, nothing is downloaded: every sample has :data:`FIELDS` categorical
fields whose values follow a Zipf-like law (a few values are frequent, most are rare, as user, ad and site ids
are); each (field, value) pair is hashed into one of ``rows`` rows of an embedding table (the hashing trick, so
unrelated pairs may share a row). The label is drawn from a hidden logistic model, one weight per (field, value)
pair, so the best possible held-out logloss is known (:attr:`CTRData.bayes_logloss`).

The model (:class:`CTRModel`): an :class:`torch.nn.EmbeddingBag` summing the fields' rows, then a small MLP to
one logit. With ``sparse=True`` the table's gradient is row-sparse (only the batch's rows: about 3,600 of the
1,048,576 at the demo's size), and :mod:`optzoo.torch`'s FTRL (``lazy=True``), Adam (lazy by default) and
AdaGrad (always lazy for row-sparse gradients) update only those rows; with ``sparse=False`` the same model gets a
dense gradient over the whole table and every row is updated. :func:`run_example` trains both from the same
initial weights on the same batches and measures the time per step. The optimizers run on their default path
(``fused=None``; the demo's ``--fused`` is for the digits).

Lazy and dense updates are the same rule only where a zero gradient leaves a row alone: AdaGrad (``wd = 0``: the
history does not grow, the step is 0). Adam's momentum keeps moving rows the batch did not touch, and FTRL
recomputes every row from its accumulators (a row never seen becomes 0 at the first dense step); their lazy and
dense losses differ.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time

import torch

__all__ = ["FIELDS", "SETTINGS", "OPTIMIZERS", "SparseConfig", "TINY", "CTRData", "make_data", "hash_rows",
           "CTRModel", "initial_model", "Run", "train_ctr", "run_example", "speedup", "logloss", "auc"]

#: (name, vocabulary size) of each categorical field of a sample
FIELDS = (("hour", 24), ("weekday", 7), ("device", 12), ("country", 200), ("site", 2_000), ("ad", 20_000),
          ("app", 50_000), ("user", 200_000))

#: the optimizers of the example, in table order (registered names, built by ``optzoo.torch.create``)
OPTIMIZERS = ("ftrl", "adam", "adagrad")

#: hyperparameters per optimizer (torch face names); the same for the sparse and the dense run. FTRL: lamda1 = 0
#: (with the batch-mean loss a rare row's gradient is ~1/batch, an L1 threshold would keep it at 0) and a small
#: beta (FTRL's first step scales a weight by about |G| / (beta + |G|): beta = 1 shrinks the MLP to nearly 0).
SETTINGS = {
    "ftrl": {"lr": 0.1, "lamda1": 0.0, "beta": 0.001, "lazy": True},
    "adam": {"lr": 0.05},   # lazy_update=True is Adam's default
    "adagrad": {"lr": 0.05},
}


@dataclasses.dataclass(frozen=True)
class SparseConfig:
    """The example's size: ``rows`` x ``dim`` embedding table, ``steps`` batches of ``batch`` training samples
    (one pass over ``steps * batch`` samples), ``n_test`` held-out samples, the MLP's ``hidden`` width."""
    rows: int = 2 ** 20
    dim: int = 16
    hidden: int = 32
    batch: int = 2048
    steps: int = 16
    n_test: int = 16_384

    @property
    def n_train(self) -> int:
        return self.steps * self.batch


#: a size for tests: a second or so for all three optimizers
TINY = SparseConfig(rows=2 ** 12, dim=4, hidden=8, batch=64, steps=6, n_test=256)


# ---------------------------------------------------------------------------------------------- data
def hash_rows(field: torch.Tensor, value: torch.Tensor, rows: int) -> torch.Tensor:
    """The table row of each (field, value) pair: a 32-bit integer hash of ``field * 2**20 + value`` (two
    multiply-xorshift rounds), modulo ``rows``. int64 arithmetic, no overflow (products stay below 2**59)."""
    x = (field.to(torch.int64) << 20) | value.to(torch.int64)
    mask = (1 << 32) - 1
    for _ in range(2):
        x = (((x >> 16) ^ x) * 0x45D9F3B) & mask
    x = (x >> 16) ^ x
    return x % rows


def _zipf(n: int, vocab: int, generator) -> torch.Tensor:
    """``n`` values in [0, vocab) with P(k) proportional to 1 / (k + 2)^1.1."""
    p = (torch.arange(vocab, dtype=torch.float64) + 2.0) ** -1.1
    cdf = torch.cumsum(p / p.sum(), 0)
    u = torch.rand(n, dtype=torch.float64, generator=generator)
    return torch.searchsorted(cdf, u).clamp_(max=vocab - 1)


@dataclasses.dataclass
class CTRData:
    """Hashed rows (int64, ``(n, len(FIELDS))``), labels (float32 0/1) and the hidden model's click probability
    for the training and the held-out samples."""
    x_train: torch.Tensor
    y_train: torch.Tensor
    p_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    p_test: torch.Tensor

    @property
    def bayes_logloss(self) -> float:
        """Held-out logloss of the hidden model itself: the best any model can expect."""
        return logloss(torch.logit(self.p_test.double()), self.y_test)

    @property
    def base_logloss(self) -> float:
        """Held-out logloss of the constant prediction (the training click rate): what learning must beat."""
        rate = self.y_train.double().mean().clamp(1e-6, 1 - 1e-6)
        return logloss(torch.logit(rate).expand(len(self.y_test)), self.y_test)

    def rows_per_batch(self, batch: int) -> float:
        """How many distinct table rows a training batch touches, on average: the rows a lazy update changes."""
        counts = [len(torch.unique(self.x_train[i:i + batch])) for i in range(0, len(self.x_train), batch)]
        return sum(counts) / len(counts) if counts else 0.0

    def to(self, device) -> "CTRData":
        return CTRData(*(t.to(device) for t in dataclasses.astuple(self)))


def make_data(config: SparseConfig = SparseConfig(), seed: int = 0) -> CTRData:
    """The training and held-out samples of :func:`the model <CTRModel>`, from a seeded generator.

    The hidden model: logit = -1.6 + sum over fields of a weight per (field, value), drawn N(0, 0.7^2); the label
    is 1 with probability sigmoid(logit) (a click rate near 0.25)."""
    g = torch.Generator().manual_seed(seed)
    # the hidden model first: the same whatever the number of samples
    weights = [torch.randn(vocab, dtype=torch.float64, generator=g) * 0.7 for _, vocab in FIELDS]
    n = config.n_train + config.n_test
    logit = torch.full((n,), -1.6, dtype=torch.float64)
    rows = []
    for f, ((_, vocab), weight) in enumerate(zip(FIELDS, weights)):
        value = _zipf(n, vocab, g)
        logit += weight[value]
        rows.append(hash_rows(torch.full_like(value, f), value, config.rows))
    x = torch.stack(rows, 1)
    p = torch.sigmoid(logit)
    y = (torch.rand(n, dtype=torch.float64, generator=g) < p).to(torch.float32)
    k = config.n_train
    return CTRData(x[:k], y[:k], p[:k].float(), x[k:], y[k:], p[k:].float())


# ---------------------------------------------------------------------------------------------- model
class CTRModel(torch.nn.Module):
    """Embedding bag (sum of the fields' rows, ``rows`` x ``dim``) -> ``dim``-``hidden``-1 MLP -> click logit."""

    def __init__(self, rows: int, dim: int, hidden: int, sparse: bool):
        super().__init__()
        # from_pretrained: the table is drawn once (EmbeddingBag(rows, dim) would draw it, then normal_ again)
        table = torch.empty(rows, dim).normal_(std=0.05)
        self.embedding = torch.nn.EmbeddingBag.from_pretrained(table, freeze=False, mode="sum", sparse=sparse)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1))

    def forward(self, x):
        return self.mlp(self.embedding(x)).squeeze(-1)


def logloss(logits: torch.Tensor, y: torch.Tensor) -> float:
    """Mean binary cross-entropy of ``logits`` against the 0/1 labels ``y``, in float64."""
    return torch.nn.functional.binary_cross_entropy_with_logits(logits.double(), y.double()).item()


def auc(scores: torch.Tensor, y: torch.Tensor) -> float:
    """Area under the ROC curve: the probability that a random positive scores above a random negative (ties
    count one half), from the ranks (Mann-Whitney U)."""
    scores, y = scores.double().cpu(), y.cpu() > 0.5
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = torch.argsort(scores)
    sorted_scores = scores[order]
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    # ties: every member of a run of equal scores gets the run's mean rank
    _, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    mean_rank = ends - (counts.double() - 1) / 2
    ranks[order] = mean_rank[inverse]
    return ((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)).item()


# ---------------------------------------------------------------------------------------------- training
@dataclasses.dataclass
class Run:
    """One optimizer, one kind of gradient: per-step batch logloss, final losses, AUC, median times (ms) of the
    optimizer's ``step()`` and of the whole training step (forward, backward, ``step()``, ``zero_grad()``)."""
    name: str
    sparse: bool
    settings: dict
    losses: list
    train_loss: float
    test_loss: float
    test_auc: float
    ms_update: float
    ms_step: float
    error: str = ""


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_ms(times) -> float:
    steady = sorted(times[1:] or times)   # the first step makes the states
    return 1e3 * steady[len(steady) // 2] if steady else float("nan")


def initial_model(config: SparseConfig = SparseConfig(), seed: int = 0, device="cpu") -> CTRModel:
    """The initial weights of every run with ``seed`` (drawn with torch's global generator seeded ``seed``)."""
    torch.manual_seed(seed)
    return CTRModel(config.rows, config.dim, config.hidden, sparse=True).to(device)


def train_ctr(name: str, data: CTRData, config: SparseConfig = SparseConfig(), *, sparse: bool, seed: int = 0,
              settings: dict | None = None, init: CTRModel | None = None, on_step=None, keep_model: bool = False):
    """Train :class:`CTRModel` with ``optzoo.torch.create(name, ...)`` for one pass over ``data.x_train`` in
    order, ``config.batch`` samples a step, from a copy of ``init`` (default: :func:`initial_model` for ``seed``:
    the same weights whatever ``sparse``). Returns a :class:`Run`, and the trained model too when ``keep_model``."""
    from .. import torch as optzoo_torch
    settings = dict(SETTINGS.get(name, {}) if settings is None else settings)
    device = data.x_train.device
    model = copy.deepcopy(init) if init is not None else initial_model(config, seed, device)
    model.embedding.sparse = sparse   # what EmbeddingBag(sparse=...) sets: the kind of gradient
    opt = optzoo_torch.create(name, model.parameters(), **settings)
    losses, t_update, t_step = [], [], []
    for start in range(0, len(data.x_train), config.batch):
        x, y = data.x_train[start:start + config.batch], data.y_train[start:start + config.batch]
        _sync(device)
        t0 = time.perf_counter()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), y)
        loss.backward()
        _sync(device)
        t1 = time.perf_counter()
        opt.step()
        _sync(device)
        t2 = time.perf_counter()
        opt.zero_grad()
        _sync(device)
        t3 = time.perf_counter()
        t_update.append(t2 - t1)
        t_step.append(t3 - t0)
        losses.append(loss.item())
        if on_step is not None:
            on_step()
    with torch.no_grad():
        train_loss = logloss(model(data.x_train), data.y_train)
        scores = model(data.x_test)
    run = Run(name, sparse, settings, losses, train_loss, logloss(scores, data.y_test), auc(scores, data.y_test),
              _median_ms(t_update), _median_ms(t_step))
    if keep_model:
        return run, model
    return run


def _failed(name, sparse, error):
    nan = float("nan")
    return Run(name, sparse, dict(SETTINGS.get(name, {})), [], nan, nan, nan, nan, nan,
               error=f"{type(error).__name__}: {error}")


def run_example(names=OPTIMIZERS, config: SparseConfig = SparseConfig(), *, seed: int = 0, device="cpu",
                on_step=None, on_run=None):
    """Train each of ``names`` with a sparse and then a dense gradient (same seed, same batches); returns
    ``(data, runs, max_diff)``: the data, the :class:`Run` list (sparse, dense per optimizer) and, per optimizer,
    the largest difference between the two trained embedding tables (0 for AdaGrad: the same update).
    ``on_run(name, sparse)`` is called before each run, ``on_step()`` after each step (progress)."""
    data = make_data(config, seed).to(device)
    init = initial_model(config, seed, device)   # drawn once (0.2 s), copied for each run (0.02 s)
    runs, max_diff = [], {}
    for name in names:
        tables = {}
        for sparse in (True, False):
            if on_run is not None:
                on_run(name, sparse)
            try:
                run, model = train_ctr(name, data, config, sparse=sparse, init=init, on_step=on_step,
                                       keep_model=True)
                tables[sparse] = model.embedding.weight.detach()
                del model
            except Exception as e:   # report, go on with the others
                run = _failed(name, sparse, e)
            runs.append(run)
        if len(tables) == 2:
            max_diff[name] = (tables[True] - tables[False]).abs_().max().item()
        del tables   # reference counting frees the runs' tables, gradients and states (no gc.collect: 0.2 s each)
    return data, runs, max_diff


def speedup(runs, name) -> float:
    """Dense ms per training step over sparse ms per training step for ``name``."""
    by = {r.sparse: r for r in runs if r.name == name}
    if True not in by or False not in by:
        return float("nan")
    s, d = by[True].ms_step, by[False].ms_step
    return d / s if s > 0 and math.isfinite(s) and math.isfinite(d) else float("nan")
