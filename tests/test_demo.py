"""``optzoo demo``: the shipped data, the state-size column, the 2-D trajectories, and one end-to-end run.

The end-to-end run and the pictures need the ``demo`` extra (matplotlib, pillow, rich), which ``make setup``
installs; outside CI they are skipped when it is missing, in CI (``CI`` set) a missing extra fails.
"""
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
    lines = {line.split()[0]: line for line in r.stdout.splitlines() if line.split()[:1] in (["sgd"], ["adam"])}
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
