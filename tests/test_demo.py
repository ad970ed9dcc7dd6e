"""``optzoo demo``: the shipped data, the state-size column, the 2-D trajectories, and one end-to-end run.

The end-to-end run and the pictures need the ``demo`` extra (matplotlib, pillow, rich), which ``make setup``
installs; outside CI they are skipped when it is missing, in CI (``CI`` set) a missing extra fails.
"""
import copy
import dataclasses
import hashlib
import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import optzoo
from optzoo.demo import data, plots, report, train, trajectories

SRC = str(Path(optzoo.__file__).resolve().parents[1])


def need(module):
    if os.environ.get("CI"):
        return importlib.import_module(module)
    return pytest.importorskip(module, reason="the demo extra is not installed (`make setup` installs it)")


# ---------------------------------------------------------------------------------------------- data
def test_digits_are_the_uci_test_set():
    images, labels = data.load_digits()
    assert images.shape == (1797, 8, 8) and images.dtype == np.uint8
    assert labels.shape == (1797,) and labels.dtype == np.uint8
    assert images.max() == 16 and images.min() == 0
    # the class counts of UCI optdigits' test set (scikit-learn's DESCR and the UCI page)
    assert np.bincount(labels).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    # the first row of scikit-learn's digits.csv.gz: a 0
    assert images[0].ravel().tolist() == [0, 0, 5, 13, 9, 1, 0, 0, 0, 0, 13, 15, 10, 15, 5, 0, 0, 3, 15, 2, 0, 11,
                                          8, 0, 0, 4, 12, 0, 0, 8, 8, 0, 0, 5, 8, 0, 0, 9, 8, 0, 0, 4, 11, 0, 1, 12,
                                          7, 0, 0, 2, 14, 5, 10, 12, 0, 0, 0, 0, 6, 13, 10, 0, 0, 0]
    assert labels[:10].tolist() == list(range(10))
    digest = hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()
    assert digest == "87ff0c9e40dc7e2c0e34e7257799c2e3f3aec1a016363bb11cad869ec428a826"


def test_split_is_a_seeded_partition():
    a, b, c = data.split(0), data.split(0), data.split(1)
    assert len(a.x_train) == 1438 and len(a.x_test) == 359
    assert a.x_train.shape[1] == 64 and a.x_train.dtype == torch.float32 and a.y_train.dtype == torch.int64
    assert float(a.x_train.max()) == 1.0 and float(a.x_train.min()) == 0.0
    assert torch.equal(a.x_test, b.x_test) and not torch.equal(a.x_test, c.x_test)
    images, labels = data.load_digits()
    # together the two halves are the whole data set, each image once, with its own label
    x = torch.cat([a.x_train, a.x_test]) * 16
    y = torch.cat([a.y_train, a.y_test])
    rows = {tuple(r): int(label) for r, label in zip(images.reshape(-1, 64).tolist(), labels.tolist())}
    seen = [tuple(int(v) for v in r) for r in x.round().tolist()]
    assert all(rows[r] == int(label) for r, label in zip(seen, y.tolist()))
    assert np.bincount(y.numpy()).tolist() == np.bincount(labels).tolist()


# ---------------------------------------------------------------------------------------------- state size
SHAPES = [(64, 64), (1, 64), (64, 10), (1, 10)]   # DigitsMLP's parameters
N = sum(a * b for a, b in SHAPES)
ROWS = sum(a for a, _ in SHAPES)


@pytest.mark.parametrize("name, settings, expected", [
    ("sgd", {"momentum": 0.0}, 0.0),
    ("sgd", {"momentum": 0.8}, 4.0),
    ("nag", {"momentum": 0.8}, 4.0),
    ("adam", {}, 8.0),
    ("adamax", {}, 8.0),
    ("nadam", {}, 8.0),
    ("adagrad", {}, 4.0),
    ("adadelta", {}, 8.0),
    ("rmsprop", {}, 4.0),
    ("rmsprop", {"centered": True}, 12.0),
    ("ftml", {}, 12.0),
    ("sgld", {}, 0.0),
    ("signum", {"momentum": 0.9}, 4.0),
    ("lbsgd", {"momentum": 0.0}, 0.0),
    ("groupadagrad", {}, 4.0 * ROWS / N),   # one fp32 accumulator per row
    ("adam", {"multi_precision": True}, 12.0),   # fp16 weights: + an fp32 master copy
])
def test_state_bytes_per_param_closed_form(name, settings, expected):
    dtype = torch.float16 if settings.get("multi_precision") else torch.float32
    params = [torch.zeros(s, dtype=dtype) for s in SHAPES]
    assert train.state_bytes_per_param(name, settings, params) == pytest.approx(expected, rel=1e-12)


def test_every_optimizer_has_demo_settings_that_construct():
    builtin = [r.name for r in optzoo.optimizer.records() if r.cls.__module__.startswith("optzoo.optimizer.")]
    assert len(builtin) >= 18
    for name in builtin:
        assert name in train.SETTINGS
        optzoo.create(name, **train.settings_for(name))


# ---------------------------------------------------------------------------------------------- trajectories
def rosenbrock_grad(x, y):
    return np.array([-2 * (1 - x) - 400 * x * (y - x * x), 200 * (y - x * x)])


def f32(x):
    """MXNet passes scalar hyperparameters to its kernels as float32, also for float64 weights."""
    return float(np.float32(x))


def test_first_sgd_and_momentum_steps_on_rosenbrock_by_hand():
    fn = trajectories.FUNCTIONS["rosenbrock"]
    w0 = np.array(fn.start)
    assert rosenbrock_grad(*w0).tolist() == [-155.0, -50.0]
    p = trajectories.trajectory(fn, "sgd", 1, {"learning_rate": 1e-3}).numpy()
    np.testing.assert_allclose(p[1], [-1.5 + 155 * f32(1e-3), 2 + 50 * f32(1e-3)], rtol=1e-15)
    np.testing.assert_allclose(p[1], [-1.345, 2.05], rtol=1e-8)
    lr, mu = f32(1e-3), f32(0.8)
    p = trajectories.trajectory(fn, "momentum", 3, {"learning_rate": 1e-3, "momentum": 0.8}).numpy()
    w, v = w0, np.zeros(2)
    for k in range(1, 4):   # the tutorial's v <- mu v - lr grad(w); w <- w + v
        v = mu * v - lr * rosenbrock_grad(*w)
        w = w + v
        np.testing.assert_allclose(p[k], w, rtol=1e-13, atol=0)


def test_sgd_on_the_valley_is_geometric():
    """f = 0.1 x^2 + 2 y^2: gradient descent multiplies x by (1 - 0.2 lr) and y by (1 - 4 lr) each step."""
    fn = trajectories.FUNCTIONS["valley"]
    lr = f32(fn.settings["sgd"]["learning_rate"])
    p = trajectories.trajectory(fn, "sgd", 40).numpy()
    k = np.arange(41)
    np.testing.assert_allclose(p[:, 0], fn.start[0] * (1 - 0.2 * lr) ** k, rtol=1e-12)
    np.testing.assert_allclose(p[:, 1], fn.start[1] * (1 - 4 * lr) ** k, rtol=1e-12, atol=1e-300)


@pytest.mark.parametrize("key, curve, steps, tol", [
    ("rosenbrock", "adam", 1000, 0.05),
    ("rosenbrock", "adam", 2000, 1e-3),
    ("beale", "adam", 1000, 0.01),
    ("beale", "adagrad", 1000, 0.02),
    ("valley", "nag", 60, 0.01),
])
def test_trajectory_reaches_the_known_minimum(key, curve, steps, tol):
    fn = trajectories.FUNCTIONS[key]
    p = trajectories.trajectory(fn, curve, steps)
    assert p.shape == (steps + 1, 2) and p.dtype == torch.float64
    assert p[0].tolist() == list(fn.start)
    assert math.dist(p[-1].tolist(), fn.minimum) < tol
    assert fn(*fn.minimum) == 0   # the stated minimum is one


def test_smooth_is_a_trailing_mean():
    np.testing.assert_allclose(plots.smooth([1, 2, 3, 4, 5], 2), [1, 1.5, 2.5, 3.5, 4.5])
    assert np.isnan(plots.smooth([1, float("nan"), 3], 2)[1])


def test_table_of_a_failed_run():
    r = train.Result("mine", {"learning_rate": 0.1}, [], *[float("nan")] * 4, error="ValueError: no")
    ok = train.Result("sgd", {}, [2.0], 0.5, 0.75, 0.1, 4.0)
    lines = report.format_table([r, ok]).splitlines()
    assert lines[2] == "| mine | failed: ValueError: no | | | | learning_rate=0.1 |"
    assert lines[3] == "| sgd | 0.5000 | 0.750 | 0.100 | 4.00 | (defaults) |"


# ---------------------------------------------------------------------------------------------- end to end
def parse_table(text):
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == list(report.COLUMNS)
    return {cells[0]: dict(zip(header, cells)) for cells in
            ([c.strip() for c in line.strip("|").split("|")] for line in lines[1:])}


def has_color(image, rgb, tol=0.04):
    rgb = np.asarray(rgb) / 255.0
    return bool((np.abs(image[..., :3] - rgb).max(axis=-1) < tol).sum() > 50)


def test_demo_end_to_end(tmp_path):
    need("matplotlib"), need("PIL"), need("rich")
    from matplotlib import image
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "optzoo", "demo", "--optimizers", "sgd,ADAM", "--epochs", "1",
                        "--trajectory-steps", "5", "--out", str(out)],
                       capture_output=True, text=True, env=env, timeout=180)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    rows = parse_table((out / "results.md").read_text())
    assert list(rows) == ["sgd", "adam"]
    # the terminal's table is aligned: the numbers of both rows end in the same column
    digits = r.stdout.split("\nsparse example")[0]   # the sparse example's table has an adam row too
    lines = {line.split()[0]: line for line in digits.splitlines() if line.split()[:1] in (["sgd"], ["adam"])}
    assert set(lines) == {"sgd", "adam"}
    for column in ("final train loss", "test accuracy", "ms/step"):
        ends = {n: lines[n].index(rows[n][column]) + len(rows[n][column]) for n in lines}
        assert ends["sgd"] == ends["adam"], (column, r.stdout)
    assert "ETA" in r.stderr
    for name, bytes_per_param in [("sgd", 4.0), ("adam", 8.0)]:   # sgd: momentum 0.8, one fp32 buffer
        row = rows[name]
        assert math.isfinite(float(row["final train loss"])) and float(row["final train loss"]) > 0
        assert 0.0 <= float(row["test accuracy"]) <= 1.0
        assert float(row["ms/step"]) > 0
        assert float(row["state B/param"]) == bytes_per_param
        assert row["settings"] == report.format_settings(train.settings_for(name))
    # one epoch of SGD with momentum fits the digits well above chance (0.1): the labels belong to the images
    assert float(rows["sgd"]["test accuracy"]) > 0.5
    blob = json.loads((out / "results.json").read_text())
    assert [row["optimizer"] for row in blob["results"]] == ["sgd", "adam"]
    for row in blob["results"]:
        assert abs(row["final_train_loss"] - float(rows[row["optimizer"]]["final train loss"])) <= 5.1e-5
        assert len(row["losses"]) == 45   # one epoch of ceil(1438 / 32) batches
    assert (out / "results.md").read_text().startswith("| optimizer |")
    loss = image.imread(out / "loss.png")
    assert loss.shape[:2] == plots.loss_px(2)[::-1]   # two families: SGD-like, adaptive
    traj = image.imread(out / "trajectories.png")
    assert traj.shape[:2] == plots.trajectories_px(2)[::-1]
    # the lines are there: sgd's tab10 blue and adam's tab10 red, in both pictures
    for rgb in [(31, 119, 180), (214, 39, 40)]:
        assert has_color(loss, rgb) and has_color(traj, rgb)
    assert not has_color(traj, (255, 127, 14))   # "momentum" (orange) was not asked for
    # the sparse example, at its full size, for the one of FTRL, Adam, AdaGrad asked for
    assert "sparse example: click-through model" in r.stdout
    md = (out / "sparse.md").read_text()
    assert [[c.strip() for c in line.split("|")[1:3]] for line in md.splitlines()
            if line.startswith("| ") and "gradient" not in line] == [["adam", "sparse"], ["", "dense"]]
    assert [row["gradient"] for row in blob["sparse"]["results"]] == ["sparse", "dense"]
    assert blob["sparse"]["config"]["rows"] == 2 ** 20
    assert image.imread(out / "sparse.png").shape[:2] == plots.SPARSE_PX[::-1]


# ---------------------------------------------------------------------------------------------- pictures
def fake(name, n=90, diverge_at=None, error=""):
    """A Result whose batch loss decays from ln 10; NaN from the 1-based step ``diverge_at`` on."""
    losses = list(2.3 * np.exp(-np.arange(n) / 40.0) + 0.01 * (np.arange(n) % 3))
    final = losses[-1] * 0.9
    if diverge_at is not None:
        losses[diverge_at - 1:] = [float("nan")] * (n - diverge_at + 1)
        final = float("nan")
    if error:
        losses, final = [], float("nan")
    return train.Result(name, {}, losses, final, 0.9, 0.5, 4.0, error=error)


def panels(fig):
    return [ax for ax in fig.axes if ax.get_visible()]


def check_legends_have_lines(ax):
    """Every legend entry of ``ax`` is a drawn line with at least one finite point, and a line or a marker."""
    legend = ax.get_legend()
    labelled = {line.get_label(): line for line in ax.get_lines() if not line.get_label().startswith("_")}
    assert legend is not None and [t.get_text() for t in legend.get_texts()] == list(labelled)
    for label, line in labelled.items():
        x, y = (np.asarray(v, dtype=float) for v in line.get_data())
        finite = np.isfinite(x) & np.isfinite(y)
        assert finite.sum() >= 2 or (finite.any() and line.get_marker() not in ("None", "", None)), label


def test_loss_plot_of_every_optimizer_is_one_panel_per_family():
    need("matplotlib")
    names = [r.name for r in optzoo.optimizer.records() if r.cls.__module__.startswith("optzoo.optimizer.")]
    fig = plots.plot_losses([fake(n, diverge_at=2 if n == "adamax" else None) for n in names], None, 45)
    axes = panels(fig)
    assert [ax.get_title(loc="left").split(" (")[0] for ax in axes] == list(plots.FAMILIES)
    assert f"{len(names)} optimizers" in fig._suptitle.get_text() and "every" not in fig._suptitle.get_text()
    drawn = []
    for ax in axes:
        check_legends_have_lines(ax)
        own = [line for line in ax.get_lines() if not line.get_label().startswith("_")]
        colors = [line.get_color() for line in own]
        assert len(set(map(tuple, colors))) == len(colors)   # distinct within a panel
        drawn += [line.get_label().split(":")[0] for line in own]
        assert "trailing mean over 1 epoch = 45 steps" in ax.get_ylabel() or not ax.get_subplotspec().is_first_col()
    assert sorted(drawn) == sorted(names)   # each optimizer in exactly one panel
    # the grey context lines carry no legend entry
    assert all(line.get_label().startswith("_") for ax in axes for line in ax.get_lines()
               if line.get_color() == "0.8")


def test_loss_plot_marks_where_a_run_diverged():
    need("matplotlib")
    fig = plots.plot_losses([fake("adam"), fake("adamax", diverge_at=30), fake("nadam", diverge_at=2)], None, 45)
    (ax,) = panels(fig)
    check_legends_have_lines(ax)
    lines = {line.get_label(): line for line in ax.get_lines()}
    for label, step in [("adamax: diverged at step 30", 30), ("nadam: diverged at step 2", 2)]:
        line = lines[label]
        x, y = line.get_data()
        assert line.get_marker() == "X" and list(line.get_markevery()) == [len(x) - 1]
        assert x[-1] == pytest.approx(step / 45) and np.isfinite(y).all()
    assert "adam" in lines and lines["adam"].get_marker() != "X"


def test_loss_plot_title_names_what_ran_and_failed_runs_have_no_entry():
    need("matplotlib")
    fig = plots.plot_losses([fake("sgd"), fake("nag"), fake("adam"), fake("mine", error="ValueError: no")], None, 45)
    assert "sgd, nag, adam and mine" in fig._suptitle.get_text()
    axes = panels(fig)
    assert [ax.get_title(loc="left") for ax in axes] == ["SGD-like (2)", "adaptive (1)", "other (1)"]
    for ax in axes[:2]:
        check_legends_have_lines(ax)
    assert axes[2].get_legend() is None
    assert any("failed to train" in t.get_text() and "mine" in t.get_text() for t in axes[2].texts)


def test_momentum_is_drawn_only_for_the_full_run():
    assert trajectories.curves_for(["sgd", "nag", "adam"]) == ["sgd", "nag", "adam"]
    assert "momentum" in trajectories.curves_for(["sgd", "nag", "adam"], everything=True)
    assert trajectories.curves_for(["ftrl"]) == []


def test_trajectories_share_one_legend_and_the_longest_path_lies_underneath():
    need("matplotlib")
    fns = trajectories.FUNCTIONS
    paths = {key: {c: trajectories.trajectory(fn, c, 30).numpy() for c in ("sgd", "nag", "adam", "adadelta")}
             for key, fn in fns.items()}
    fig = plots.plot_trajectories(fns, paths, None)
    axes = panels(fig)
    assert len(axes) == 2 * len(fns)   # rows: SGD-like, adaptive; columns: the functions
    assert all(ax.get_legend() is None for ax in axes)
    (legend,) = fig.legends
    labels = [t.get_text() for t in legend.get_texts()]
    assert labels[:4] == ["sgd", "nag", "adam", "adadelta"]
    assert any(lab.startswith("start") for lab in labels) and any(lab.startswith("end") for lab in labels)
    assert "momentum" not in " ".join(labels)
    assert "sgd, nag, adam and adadelta" in fig._suptitle.get_text()
    for ax in axes:
        own = [line for line in ax.get_lines() if not line.get_label().startswith("_")]
        length = {line.get_label(): np.linalg.norm(np.diff(np.column_stack(line.get_data()), axis=0), axis=1).sum()
                  for line in own}
        by_z = sorted(own, key=lambda line: line.get_zorder())
        assert [length[line.get_label()] for line in by_z] == sorted(length.values(), reverse=True)
        assert [line.get_linewidth() for line in by_z] == sorted((line.get_linewidth() for line in by_z),
                                                                reverse=True)


def test_terminal_table_fits_80_columns_and_keeps_every_setting():
    need("rich")
    from rich.console import Console
    results = [fake(n) for n in ("sgd", "lbsgd", "adamax")]
    console = Console(width=80, record=True, file=open(os.devnull, "w"))
    console.print(report.rich_table(results))
    text = console.export_text()
    assert max(len(line.rstrip()) for line in text.splitlines()) <= 80
    flat = " ".join(text.split())
    for r in results:
        for k, v in r.settings.items():
            assert f"{k}={v}" in flat
    assert "adamax [1]" in text and report.format_footnotes(results).startswith("[1] adamax:")


def test_make_demo_says_how_to_run_optzoo_next():
    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    target = makefile.split("\ndemo:", 1)[1].split("\n\n", 1)[0]
    assert ".venv/bin/optzoo" in target and "echo" in target


def test_console_script_is_declared():
    from importlib import metadata
    try:
        eps = metadata.entry_points(group="console_scripts", name="optzoo")
    except metadata.PackageNotFoundError:  # pragma: no cover
        eps = ()
    if not eps:
        if os.environ.get("CI"):
            pytest.fail("the optzoo console script is not installed")
        pytest.skip("optzoo is not pip-installed here")
    assert [ep.value for ep in eps] == ["optzoo.cli:main"]


# ---------------------------------------------------------------------------------------------- sparse example
from optzoo.demo import sparse  # noqa: E402

#: small, and a batch that learns in a few steps
SMALL = sparse.SparseConfig(rows=2 ** 14, dim=8, hidden=16, batch=512, steps=12, n_test=4096)


def mueller_hash(field, value, rows):
    """hash_rows in plain Python ints: two rounds of x = ((x >> 16) ^ x) * 0x45d9f3b mod 2^32, then a xorshift."""
    x = (field << 20) | value
    for _ in range(2):
        x = (((x >> 16) ^ x) * 0x45D9F3B) % 2 ** 32
    return ((x >> 16) ^ x) % rows


def test_hash_rows_is_the_32_bit_integer_hash():
    field = torch.tensor([0, 0, 1, 7, 7, 3])
    value = torch.tensor([0, 1, 0, 199_999, 5, 2 ** 20 - 1])
    got = sparse.hash_rows(field, value, 2 ** 20).tolist()
    assert got == [mueller_hash(f, v, 2 ** 20) for f, v in zip(field.tolist(), value.tolist())]
    assert got[0] == 0 and len(set(got[1:])) == 5   # 0 hashes to 0; the others spread


def test_ctr_data_is_seeded_and_has_a_signal():
    a, b, c = sparse.make_data(SMALL, 0), sparse.make_data(SMALL, 0), sparse.make_data(SMALL, 1)
    assert a.x_train.shape == (SMALL.n_train, len(sparse.FIELDS)) and a.x_train.dtype == torch.int64
    assert a.x_test.shape == (SMALL.n_test, len(sparse.FIELDS)) and a.y_test.dtype == torch.float32
    assert int(a.x_train.min()) >= 0 and int(a.x_train.max()) < SMALL.rows
    for x, y in zip((a.x_train, a.y_train, a.x_test, a.p_test), (b.x_train, b.y_train, b.x_test, b.p_test)):
        assert torch.equal(x, y)
    assert not torch.equal(a.x_train, c.x_train)
    assert set(a.y_train.unique().tolist()) == {0.0, 1.0}
    assert 0.15 < float(a.y_train.mean()) < 0.35   # logit -1.6 plus noise: a click rate near 0.25
    # the labels follow the hidden probabilities: their mean agrees within 4 standard errors
    n = len(a.y_train)
    assert abs(float(a.y_train.mean() - a.p_train.mean())) < 4 * math.sqrt(0.25 / n)
    # the hidden model beats the constant click rate by far: there is something to learn
    assert a.bayes_logloss < a.base_logloss - 0.08
    # a field's column holds at most its vocabulary's number of rows: hour 24, weekday 7, device 12
    for f, (_, vocab) in enumerate(sparse.FIELDS[:3]):
        assert len(torch.cat([a.x_train[:, f], a.x_test[:, f]]).unique()) <= vocab
    # Zipf-like: the most frequent user is far more frequent than a uniform one would be (1 / 200,000)
    users = torch.cat([a.x_train[:, 7], a.x_test[:, 7]])
    assert users.bincount().max() > 100 * len(users) / 200_000


def test_auc_is_the_pairwise_probability():
    g = torch.Generator().manual_seed(3)
    scores = torch.randint(0, 7, (300,), generator=g).double()   # many ties
    y = (torch.rand(300, generator=g) < 0.3).float()
    pos, neg = scores[y == 1].tolist(), scores[y == 0].tolist()
    pairs = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p in pos for q in neg)
    assert sparse.auc(scores, y) == pytest.approx(pairs / (len(pos) * len(neg)), rel=1e-12)
    assert sparse.auc(torch.tensor([0.1, 0.2, 0.9]), torch.tensor([0.0, 0.0, 1.0])) == 1.0
    assert math.isnan(sparse.auc(torch.tensor([0.1, 0.2]), torch.tensor([1.0, 1.0])))
    assert sparse.logloss(torch.zeros(5), torch.tensor([0.0, 1, 1, 0, 1])) == pytest.approx(math.log(2), rel=1e-15)


def grads_of(model, x, y):
    model.zero_grad(set_to_none=True)
    torch.nn.functional.binary_cross_entropy_with_logits(model(x), y).backward()
    return model.embedding.weight.grad


def twin_models(config=SMALL, seed=0):
    init = sparse.initial_model(config, seed)
    a, b = copy.deepcopy(init), copy.deepcopy(init)
    a.embedding.sparse, b.embedding.sparse = True, False
    return init, a, b


def a_batch(rows, n=64, fields=8, seed=0):
    """A batch that uses exactly ``rows`` (a 1-D tensor of table rows), each at least once."""
    g = torch.Generator().manual_seed(seed)
    x = rows[torch.randint(0, len(rows), (n, fields), generator=g)]
    x.view(-1)[:len(rows)] = rows
    return x, (torch.rand(n, generator=g) < 0.3).float()


def test_sparse_adagrad_step_is_the_dense_step_and_the_closed_form():
    init, sp, de = twin_models()
    touched = torch.arange(100, 400, 3)
    x, y = a_batch(touched)
    gs, gd = grads_of(sp, x, y), grads_of(de, x, y)
    assert gs.is_sparse and not gd.is_sparse
    torch.testing.assert_close(gs.coalesce().to_dense(), gd, rtol=1e-6, atol=1e-9)
    lr, eps = 0.05, 1e-7
    opts = [optzoo.torch.AdaGrad(m.parameters(), lr=lr, eps=eps) for m in (sp, de)]
    for opt in opts:
        opt.step()
    w0 = init.embedding.weight.detach().double()
    g = gd.double()
    expected = w0 - lr * g / torch.sqrt(g * g + eps)   # h = g^2 after the first step
    untouched = torch.ones(SMALL.rows, dtype=torch.bool)
    untouched[touched] = False
    for m in (sp, de):
        w = m.embedding.weight.detach()
        torch.testing.assert_close(w.double(), expected, rtol=2e-6, atol=1e-7)
        assert torch.equal(w[untouched], init.embedding.weight[untouched])
    # the two updates agree to the last bit: the lazy update is the dense one where the gradient is 0 (and torch's
    # sparse and dense backward sum a row's gradient in the same order, checked above to 1e-6 only)
    assert torch.equal(sp.embedding.weight, de.embedding.weight)
    assert not torch.equal(sp.embedding.weight[touched], init.embedding.weight[touched])


def test_lazy_adam_leaves_rows_the_batch_missed_and_dense_adam_moves_them():
    init, sp, de = twin_models()
    first, second = torch.arange(0, 50), torch.arange(50, 120)
    lr, b1, b2, eps = 0.01, 0.9, 0.999, 1e-8
    opts = [optzoo.torch.Adam(m.parameters(), lr=lr) for m in (sp, de)]
    after, grads = [], []
    for x, y in (a_batch(first, seed=1), a_batch(second, seed=2)):
        grads.append([grads_of(m, x, y) for m in (sp, de)])
        for opt in opts:
            opt.step()
        after.append([m.embedding.weight.detach().clone() for m in (sp, de)])
    w0 = init.embedding.weight.detach()
    never = torch.arange(120, SMALL.rows)
    (s1, d1), (s2, d2) = after
    # step 1: m = v = 0 on the rows it did not touch, so neither update moves them
    for w in (s1, d1):
        assert torch.equal(w[50:], w0[50:])
        assert (w[:50] != w0[:50]).all()
    # step 2: lazy leaves the first batch's rows as step 1 left them; dense keeps moving them (momentum)
    assert torch.equal(s2[first], s1[first])
    assert (d2[first] != d1[first]).all()
    assert torch.equal(s2[never], w0[never]) and torch.equal(d2[never], w0[never])
    # the second batch's rows: Adam's first step from m = v = 0, at count 2 (the count advances for the whole
    # parameter), w - lr sqrt(1 - b2^2) / (1 - b1^2) * m / (sqrt(v) + eps), m = (1 - b1) g, v = (1 - b2) g^2
    g = grads[1][0].coalesce().to_dense()[second].double()
    expected = s1[second].double() - lr * math.sqrt(1 - b2 ** 2) / (1 - b1 ** 2) * (1 - b1) * g / (
        torch.sqrt((1 - b2) * g * g) + eps)
    # (the updates are ~7e-3; 1e-7: the optimizer sums the uncoalesced gradient's duplicates in its own order, which
    # moves a gradient that nearly cancels, where sqrt(v) is near eps)
    torch.testing.assert_close(s2[second].double(), expected, rtol=1e-5, atol=1e-7)


def test_lazy_ftrl_first_step_by_hand():
    init, sp, de = twin_models()
    touched = torch.arange(7, 700, 7)
    x, y = a_batch(touched, seed=4)
    lr, beta = 0.1, 0.001
    opts = [optzoo.torch.Ftrl(m.parameters(), lr=lr, lamda1=0.0, beta=beta, lazy=True) for m in (sp, de)]
    gd = grads_of(de, x, y).double()
    grads_of(sp, x, y)
    for opt in opts:
        opt.step()
    w0 = init.embedding.weight.detach().double()
    # from z = n = 0: z = G - |G| w0 / lr, n = G^2, w = -z / ((beta + |G|) / lr) where z != 0
    G = gd[touched]
    z = G - G.abs() * w0[touched] / lr
    expected = -z / ((beta + G.abs()) / lr) * (z != 0)
    for m in (sp, de):
        torch.testing.assert_close(m.embedding.weight.detach()[touched].double(), expected, rtol=1e-5, atol=1e-7)
    untouched = torch.ones(SMALL.rows, dtype=torch.bool)
    untouched[touched] = False
    # lazy: the rows the batch missed keep their initial weights; dense: z = 0 there, so FTRL sets them to 0
    assert torch.equal(sp.embedding.weight[untouched], init.embedding.weight[untouched])
    assert bool((de.embedding.weight[untouched] == 0).all())


def test_sparse_example_runs_and_adagrad_agrees_with_its_dense_twin():
    data, runs, max_diff = sparse.run_example(config=SMALL)
    assert [(r.name, r.sparse) for r in runs] == [(n, s) for n in sparse.OPTIMIZERS for s in (True, False)]
    for r in runs:
        assert not r.error, r.error
        assert len(r.losses) == SMALL.steps and all(map(math.isfinite, r.losses))
        assert r.settings == sparse.SETTINGS[r.name]
        assert r.ms_update > 0 and r.ms_step >= r.ms_update
        # every optimizer learns something: below the constant click rate's held-out loss
        assert r.test_loss < data.base_logloss, (r.name, r.sparse, r.test_loss, data.base_logloss)
        assert 0.5 < r.test_auc <= 1.0
    by = {(r.name, r.sparse): r for r in runs}
    # AdaGrad: the lazy update is the dense one (wd = 0); the same numbers up to the order in which the two
    # backward passes sum a row's gradient (bit-identical with torch 2.13 on the CPU)
    assert max_diff["adagrad"] <= 1e-6
    assert by["adagrad", True].losses == pytest.approx(by["adagrad", False].losses, rel=1e-6)
    assert by["adagrad", True].test_loss == pytest.approx(by["adagrad", False].test_loss, rel=1e-6)
    # FTRL and Adam: the dense update moves rows the batch missed; the tables differ
    assert max_diff["ftrl"] > 1e-3 and max_diff["adam"] > 1e-3
    assert by["adam", True].losses[0] == by["adam", False].losses[0]   # same start, same first batch
    assert by["adam", True].losses[-1] != by["adam", False].losses[-1]


def fake_runs():
    rows = []
    for k, name in enumerate(sparse.OPTIMIZERS):
        for is_sparse in (True, False):
            ms = 2.0 + k if is_sparse else 40.0 + k
            rows.append(sparse.Run(name, is_sparse, dict(sparse.SETTINGS[name]), [0.7, 0.5, 0.45], 0.44, 0.46, 0.8,
                                   ms * 0.6, ms))
    return rows


def test_sparse_table_rows_and_json():
    runs = fake_runs()
    runs[3] = dataclasses.replace(runs[3], error="RuntimeError: no", losses=[], ms_step=float("nan"))
    speedups = {n: sparse.speedup(runs, n) for n in sparse.OPTIMIZERS}
    assert speedups["ftrl"] == pytest.approx(20.0) and math.isnan(speedups["adam"])
    lines = report.format_sparse_table(runs, speedups).splitlines()
    assert lines[0] == "| " + " | ".join(report.SPARSE_COLUMNS) + " |"
    assert lines[2] == ("| ftrl | sparse | 0.4400 | 0.4600 | 0.800 | 1.20 | 2.00 | 20.0x | "
                        "lr=0.1, lamda1=0.0, beta=0.001, lazy=True |")
    assert lines[3] == "|  | dense | 0.4400 | 0.4600 | 0.800 | 24.00 | 40.00 |  |  |"
    assert lines[5] == "|  | dense | failed: RuntimeError: no |  |  |  |  |  |  |"
    assert all(line.count("|") == len(report.SPARSE_COLUMNS) + 1 for line in lines)
    blob = report.sparse_to_json(runs, speedups, {"ftrl": 0.25, "adagrad": 0.0}, {"rows": 4}, {"base_logloss": 0.5})
    json.dumps(blob)   # plain JSON: NaN became None
    assert blob["speedup"] == {"ftrl": 20.0, "adam": None, "adagrad": pytest.approx(42.0 / 4.0)}
    assert blob["results"][3]["error"] == "RuntimeError: no" and blob["results"][3]["ms_per_step"] is None
    assert report.format_sparse_notes({"ftrl": 0.25, "adagrad": 0.0}).endswith("ftrl 0.25, adagrad 0 (bit-identical)")


def test_sparse_plot_draws_every_run():
    need("matplotlib")
    fig = plots.plot_sparse(fake_runs(), None, bayes_logloss=0.36, base_logloss=0.52, samples_per_step=2048)
    ax, bx = panels(fig)
    labels = [line.get_label() for line in ax.get_lines() if not line.get_label().startswith("_")]
    assert labels == [f"{n}, {k}" for n in sparse.OPTIMIZERS for k in ("sparse", "dense")]
    for line in ax.get_lines():
        if line.get_label().endswith("dense"):
            assert line.get_linestyle() not in ("-", "solid")
    assert ax.get_xlabel() == "training samples seen"
    assert {round(y, 6) for line in ax.get_lines() if line.get_label().startswith("_")
            for y in line.get_ydata()} >= {0.36, 0.52}
    heights = sorted(round(p.get_height(), 6) for p in bx.patches)
    # a bar per run (the whole step) and its optimizer.step() part
    assert heights == sorted([2.0, 1.2, 40.0, 24.0, 3.0, 1.8, 41.0, 24.6, 4.0, 2.4, 42.0, 25.2])
    texts = [t.get_text() for t in bx.texts]
    assert "20.0x" in texts and "10.5x" in texts


def test_demo_run_with_a_tiny_sparse_example(tmp_path, capsys):
    need("matplotlib"), need("PIL"), need("rich")
    from matplotlib import image
    from optzoo.demo.run import DemoConfig, run
    threads = torch.get_num_threads()
    try:
        status = run(DemoConfig(optimizers=["adagrad", "ftrl"], epochs=1, trajectory_steps=2, out=tmp_path,
                                sparse_size=sparse.TINY))
    finally:
        torch.set_num_threads(threads)
    assert status == 0
    out = capsys.readouterr().out
    assert "sparse example: click-through model" in out and "largest |difference|" in out
    md = (tmp_path / "sparse.md").read_text()
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in md.splitlines() if line.startswith("| ")]
    assert [r[:2] for r in rows[1:]] == [["ftrl", "sparse"], ["", "dense"], ["adagrad", "sparse"], ["", "dense"]]
    assert rows[3][2:5] == rows[4][2:5]   # adagrad: the same losses and AUC sparse and dense
    assert list(parse_table((tmp_path / "results.md").read_text())) == ["adagrad", "ftrl"]   # its own file
    blob = json.loads((tmp_path / "results.json").read_text())
    assert [r["optimizer"] for r in blob["results"]] == ["adagrad", "ftrl"]
    assert [(r["optimizer"], r["gradient"]) for r in blob["sparse"]["results"]] == [
        ("ftrl", "sparse"), ("ftrl", "dense"), ("adagrad", "sparse"), ("adagrad", "dense")]
    assert blob["sparse"]["config"]["rows"] == sparse.TINY.rows
    assert blob["sparse"]["max_table_difference"]["adagrad"] == 0
    assert blob["sparse"]["bayes_logloss"] < blob["sparse"]["base_logloss"]
    assert image.imread(tmp_path / "sparse.png").shape[:2] == plots.SPARSE_PX[::-1]


def test_demo_run_without_a_sparse_optimizer_says_so(tmp_path, capsys):
    need("matplotlib"), need("PIL"), need("rich")
    from optzoo.demo.run import DemoConfig, run
    threads = torch.get_num_threads()
    try:
        assert run(DemoConfig(optimizers=["sgd"], epochs=1, trajectory_steps=2, out=tmp_path)) == 0
    finally:
        torch.set_num_threads(threads)
    assert "(no sparse example: it runs ftrl, adam, adagrad)" in capsys.readouterr().out
    assert not (tmp_path / "sparse.md").exists() and "sparse" not in json.loads((tmp_path / "results.json").read_text())
