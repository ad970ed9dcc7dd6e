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
    rows = parse_table(r.stdout)
    assert list(rows) == ["sgd", "adam"]
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
    assert loss.shape[:2] == plots.LOSS_PX[::-1]
    traj = image.imread(out / "trajectories.png")
    assert traj.shape[:2] == plots.TRAJECTORIES_PX[::-1]
    # the lines are there: the first two tab10 colours (sgd, adam; then sgd, momentum, adam on the panels)
    for rgb in [(31, 119, 180), (255, 127, 14)]:
        assert has_color(loss, rgb) and has_color(traj, rgb)
    assert has_color(traj, (44, 160, 44))


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
