"""Trainer checkpoints: exact resume in a fresh process for every optimizer, atomic writes, safe loads."""
import os
import subprocess
import sys

import pytest
import torch

import optzoo
from optzoo import _io
from optzoo.optimizer._tree import leaves
from resume_worker import STEPS, build, train
from specs import SPECS

HERE = os.path.dirname(os.path.abspath(__file__))


def test_resume_in_a_fresh_process_is_bit_identical_for_every_optimizer(tmp_path):
    """Train 20 steps, save, train 20 more; versus load in a new process and train 20 -> identical weights."""
    finals = {}
    for spec in SPECS:
        trainer, params = build(spec.name)
        train(trainer, params, 0)
        torch.save([p.detach() for p in params], tmp_path / f"{spec.name}.weights")
        trainer.save_states(tmp_path / f"{spec.name}.states")
        torch.manual_seed(1234)
        train(trainer, params, STEPS)
        finals[spec.name] = [p.detach().clone() for p in params]
    env = dict(os.environ, PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run([sys.executable, os.path.join(HERE, "resume_worker.py"), str(tmp_path), *finals],
                   check=True, env=env, timeout=300)
    for name, expected in finals.items():
        resumed = torch.load(tmp_path / f"{name}.final", weights_only=True)
        for a, b in zip(expected, resumed):
            assert torch.equal(a, b), name


def snapshot(trainer, params):
    return ([p.detach().clone() for p in params],
            {i: [t.clone() for t in leaves(s)] for i, s in trainer._updater.states.items()},
            dict(trainer.optimizer._index_update_count), trainer.optimizer.num_update, trainer.lr_mult)


def assert_same(a, b):
    assert all(torch.equal(x, y) for x, y in zip(a[0], b[0]))
    assert a[1].keys() == b[1].keys()
    assert all(torch.equal(x, y) for k in a[1] for x, y in zip(a[1][k], b[1][k]))
    assert a[2:] == b[2:]


@pytest.fixture
def trained(tmp_path):
    trainer, params = build("adam")
    train(trainer, params, 0, steps=3)
    path = tmp_path / "adam.states"
    trainer.save_states(path)
    return trainer, params, path


def test_damaged_or_mismatched_files_leave_the_trainer_unchanged(trained, tmp_path):
    trainer, params, path = trained
    train(trainer, params, 3, steps=2)
    before = snapshot(trainer, params)
    data = path.read_bytes()
    cases = {"truncated": data[: len(data) // 2], "corrupted": bytes(reversed(data)), "empty": b""}
    for label, blob in cases.items():
        bad = tmp_path / label
        bad.write_bytes(blob)
        with pytest.raises(ValueError, match="could not be read"):
            trainer.load_states(bad)
    other, _ = build("rmsprop")
    other.save_states(tmp_path / "rmsprop.states")
    with pytest.raises(ValueError, match="holds optimizer 'rmsprop'"):
        trainer.load_states(tmp_path / "rmsprop.states")
    renamed = optzoo.Trainer({"x": torch.nn.Parameter(torch.zeros(3, 4)), "p1.weight": params[1]}, "adam")
    renamed.save_states(tmp_path / "renamed.states")
    with pytest.raises(ValueError, match=r"missing \['p0.weight'\], unexpected \['x'\]"):
        trainer.load_states(tmp_path / "renamed.states")
    reshaped = optzoo.Trainer({"p0.weight": torch.nn.Parameter(torch.zeros(4, 3)), "p1.weight": params[1]}, "adam")
    reshaped.save_states(tmp_path / "reshaped.states")
    with pytest.raises(ValueError, match="'p0.weight' was saved with shape \\(4, 3\\)"):
        trainer.load_states(tmp_path / "reshaped.states")
    torch.save({"format": "something else"}, tmp_path / "foreign")
    with pytest.raises(ValueError, match="not an optzoo trainer states file"):
        trainer.load_states(tmp_path / "foreign")
    with pytest.raises(FileNotFoundError):
        trainer.load_states(tmp_path / "missing")
    assert_same(before, snapshot(trainer, params))


def test_states_are_keyed_by_name_not_position(trained):
    trainer, params, path = trained
    weights = [p.detach().clone() for p in params]
    train(trainer, params, 3, steps=4)
    # the same parameters given in the other order: indices differ, names do not
    fresh = [torch.nn.Parameter(w.clone()) for w in weights]
    swapped = optzoo.Trainer([("p1.weight", fresh[1]), ("p0.weight", fresh[0])], "adam")
    swapped.load_states(path)
    assert swapped.lr_mult == {"p1.weight": 0.5, "p0.weight": 1.0}
    train(swapped, [fresh[1], fresh[0]][::-1], 3, steps=4)
    for a, b in zip(params, fresh):
        assert torch.equal(a.detach(), b.detach())


def test_save_is_atomic(trained, tmp_path, monkeypatch):
    trainer, params, path = trained
    good = path.read_bytes()

    def crash(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(_io.torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        trainer.save_states(path)
    assert path.read_bytes() == good
    assert sorted(os.listdir(tmp_path)) == ["adam.states"]   # no temporary file left behind
