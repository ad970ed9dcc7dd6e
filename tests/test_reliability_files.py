"""Checkpoints and the Trainer's inputs under damage and faults (issue 12): every corruption is a ValueError
naming the file, loaded values pass the constructor's checks, failed calls change nothing, file errors
are OSErrors naming the path and the cause."""
import errno
import math
import os
import warnings

import numpy as np
import pytest
import torch

import optzoo
from optzoo import _io, optimizer
from optzoo.optimizer._tree import leaves

HERE = os.path.dirname(os.path.abspath(__file__))


def build(name="adam", **kwargs):
    gen = torch.Generator().manual_seed(0)
    params = {"p0.weight": torch.nn.Parameter(torch.randn(3, 4, generator=gen)),
              "p1.weight": torch.nn.Parameter(torch.randn(5, generator=gen))}
    trainer = optzoo.Trainer(params, name, kwargs or None)
    trainer.set_lr_mult({"p1.weight": 0.5})
    return trainer, list(params.values())


def train(trainer, params, steps=3, first=0):
    for step in range(first, first + steps):
        gen = torch.Generator().manual_seed(100 + step)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        trainer.step(2)


def snapshot(trainer, params):
    opt = trainer.optimizer
    return ([p.detach().clone() for p in params],
            {i: [t.clone() for t in leaves(s)] for i, s in trainer._updater.states.items()},
            {c: dict(v) for c, v in opt._all_index_update_counts.items()}, opt.num_update, opt.rescale_grad,
            trainer.lr_mult, trainer.wd_mult, type(opt), opt.learning_rate)


def assert_same(a, b):
    assert len(a[0]) == len(b[0]) and all(torch.equal(x, y) for x, y in zip(a[0], b[0]))
    assert a[1].keys() == b[1].keys()
    assert all(torch.equal(x, y) for k in a[1] for x, y in zip(a[1][k], b[1][k]))
    assert a[2:] == b[2:]


@pytest.fixture
def saved(tmp_path):
    trainer, params = build()
    train(trainer, params)
    path = tmp_path / "adam.states"
    trainer.save_states(path)
    return trainer, params, path


def rewrite(path, edit):
    """A file with a valid digest whose payload ``edit`` changed (as a hand edit, saved through optzoo)."""
    blob = _io.safe_load(path, "optzoo.trainer/1", "trainer states")
    edit(blob)
    _io.atomic_save(blob, path)


# ---------------------------------------------------------------------------------------------- integrity
def test_every_flipped_byte_and_every_truncation_is_a_value_error_naming_the_file(saved, tmp_path):
    trainer, params, path = saved
    before = snapshot(trainer, params)
    data = path.read_bytes()
    bad = tmp_path / "bad.states"
    positions = list(range(0, len(data), 7)) + [len(data) - 1]
    for pos in positions:
        damaged = bytearray(data)
        damaged[pos] ^= 0xFF if pos % 2 else 0x01
        bad.write_bytes(bytes(damaged))
        with pytest.raises(ValueError) as info:
            trainer.load_states(bad)
        assert repr(str(bad)) in str(info.value), (pos, info.value)
    for length in (0, 1, 10, len(_io.MAGIC), len(_io.MAGIC) + 31, len(_io.MAGIC) + 32, len(data) // 2,
                   len(data) - 1):
        bad.write_bytes(data[:length])
        with pytest.raises(ValueError, match="could not be read") as info:
            trainer.load_states(bad)
        assert repr(str(bad)) in str(info.value)
    assert_same(before, snapshot(trainer, params))
    trainer.load_states(path)  # the undamaged file still loads
    assert_same(before, snapshot(trainer, params))


def test_updater_blob_carries_a_digest_too():
    up = optimizer.get_updater(optimizer.create("adam"))
    w = torch.randn(4)
    up(0, torch.randn(4), w)
    blob = up.get_states(dump_optimizer=True)
    assert blob.startswith(_io.MAGIC)
    before = [t.clone() for t in leaves(up.states[0])]
    for pos in range(0, len(blob), 7):
        damaged = bytearray(blob)
        damaged[pos] ^= 0x10
        with pytest.raises(ValueError, match="^states "):
            up.set_states(bytes(damaged))
    with pytest.raises(ValueError, match="could not be read"):
        up.set_states(blob[:-1])
    assert all(torch.equal(a, b) for a, b in zip(before, leaves(up.states[0])))
    fresh = optimizer.get_updater(optimizer.create("adam"))
    fresh.set_states(blob)
    assert all(torch.equal(a, b) for a, b in zip(before, leaves(fresh.states[0])))


def test_files_written_before_the_digest_still_load_with_a_warning(saved, tmp_path):
    """Decision: the payload layout is unchanged (format optzoo.trainer/1); a bare torch.save zip of it (what
    optzoo wrote before the digest) loads, with a UserWarning that it cannot be verified."""
    trainer, params, path = saved
    legacy = tmp_path / "legacy.states"
    legacy.write_bytes(path.read_bytes()[len(_io.MAGIC) + 32:])  # the payload alone: the old file
    other, other_params = build()
    with pytest.warns(UserWarning, match="cannot be verified"):
        other.load_states(legacy)
    for p, q in zip(params, other_params):
        with torch.no_grad():
            q.copy_(p)
    train(trainer, params, 2, first=10)
    train(other, other_params, 2, first=10)
    assert all(torch.equal(p, q) for p, q in zip(params, other_params))


def test_a_pickle_that_runs_code_is_refused_even_with_a_valid_digest(saved, tmp_path):
    trainer, params, path = saved
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    evil = tmp_path / "evil.states"
    evil.write_bytes(_io.dumps({"format": "optzoo.trainer/1", "x": Evil()}))
    with pytest.raises(ValueError, match="could not be read"):
        trainer.load_states(evil)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------- loaded values
@pytest.mark.parametrize("key,value,named", [
    ("lr", "abc", "learning_rate='abc'"), ("beta1", 5, "beta1=5"), ("epsilon", float("nan"), "epsilon=nan"),
    ("beta2", float("inf"), "beta2=inf"), ("wd", "x", "wd='x'"), ("num_update", -1, "num_update=-1"),
])
def test_loaded_hyperparameters_pass_the_constructors_checks(saved, key, value, named):
    trainer, params, path = saved
    before = snapshot(trainer, params)
    rewrite(path, lambda blob: blob["optimizer"]["vars"].__setitem__(key, value))
    with pytest.raises(ValueError, match=named) as info:
        trainer.load_states(path)
    assert repr(str(path)) in str(info.value)
    assert_same(before, snapshot(trainer, params))


@pytest.mark.parametrize("edit,expected", [
    (lambda b: b.pop("params"), "'params' entry is missing"),
    (lambda b: b.pop("states"), "'states' entry is missing"),
    (lambda b: b["optimizer"].pop("vars"), "no vars"),
    (lambda b: b["params"]["p0.weight"].pop("shape"), "'p0.weight'"),
    (lambda b: b["params"]["p1.weight"].__setitem__("lr_mult", float("nan")), r"lr_mult\['p1.weight'\]=nan"),
    (lambda b: b["optimizer"]["vars"]["_all_index_update_counts"][0].__setitem__(0, "x"), "update count"),
    (lambda b: b["states"].__setitem__("p0.weight", (torch.zeros(1),)), "the state of 'p0.weight'"),
])
def test_hand_edited_files_are_value_errors_not_key_errors(saved, edit, expected):
    trainer, params, path = saved
    before = snapshot(trainer, params)
    rewrite(path, edit)
    with pytest.raises(ValueError, match=expected) as info:
        trainer.load_states(path)
    assert repr(str(path)) in str(info.value)
    assert_same(before, snapshot(trainer, params))


def test_numpy_scalar_hyperparameters_save_and_load(tmp_path):
    trainer, params = build(learning_rate=np.float64(0.01), beta1=np.float32(0.8))
    trainer.set_lr_mult({"p0.weight": np.float32(2.0)})
    train(trainer, params)
    trainer.save_states(tmp_path / "np.states")
    other, _ = build()
    other.load_states(tmp_path / "np.states")
    assert other.learning_rate == pytest.approx(0.01) and other.optimizer.beta1 == pytest.approx(0.8)
    assert type(other.lr_mult["p0.weight"]) is float
    up = optimizer.get_updater(optimizer.create("adam", learning_rate=np.float64(0.02)))
    up(0, torch.randn(3), torch.randn(3))
    fresh = optimizer.get_updater(optimizer.create("adam"))
    fresh.set_states(up.get_states(dump_optimizer=True))
    assert fresh.optimizer.learning_rate == 0.02


def test_set_states_refuses_the_states_of_another_optimizer_by_name():
    adam = optimizer.get_updater(optimizer.create("adam"))
    adam(0, torch.randn(4), torch.randn(4))
    adadelta = optimizer.get_updater(optimizer.create("adadelta"))
    # (mean, var) and (acc_g, acc_delta): the same structure, another optimizer
    with pytest.raises(ValueError, match="states of adam, expected adadelta"):
        adadelta.set_states(adam.get_states())
    assert adadelta.states == {}
    # with the optimizer dumped, it replaces this one (MXNet's semantics), states and all
    adadelta.set_states(adam.get_states(dump_optimizer=True))
    assert type(adadelta.optimizer) is optimizer.Adam


def _edited(blob_bytes, edit):
    blob = _io.loads(blob_bytes, "optzoo.updater/1", "states", "states")
    edit(blob)
    return _io.dumps(blob)


@pytest.mark.parametrize("edit,expected", [
    (lambda b: b["states"].__setitem__(0, (torch.zeros(4),)), "the state of index 0 has the layout"),
    (lambda b: b["states"].__setitem__(0, "abc"), "holds a str"),
    (lambda b: b.__setitem__("states", [1, 2]), "malformed"),
    (lambda b: b["optimizer"]["vars"].__setitem__("beta1", 5), "beta1=5"),
    (lambda b: b["optimizer"]["kwargs"].__setitem__("bogus", 1), "bogus"),
    (lambda b: b["optimizer"].__setitem__("name", "nosuch"), "nosuch"),
])
def test_set_states_is_all_or_nothing(edit, expected):
    adam = optimizer.get_updater(optimizer.create("adam"))
    adam(0, torch.randn(4), torch.randn(4))
    target = optimizer.get_updater(optimizer.create("sgd", momentum=0.9))
    w = torch.randn(4)
    target(0, torch.randn(4), w)
    opt, states = target.optimizer, [t.clone() for t in leaves(target.states[0])]
    with pytest.raises(ValueError, match=expected):
        target.set_states(_edited(adam.get_states(dump_optimizer=True), edit))
    assert target.optimizer is opt and type(opt) is optimizer.SGD
    assert all(torch.equal(a, b) for a, b in zip(states, leaves(target.states[0])))


# ---------------------------------------------------------------------------------------------- trainer inputs
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), "2", True])
@pytest.mark.parametrize("setter", ["set_lr_mult", "set_wd_mult"])
def test_multipliers_refuse_nan_inf_and_non_numbers(setter, value):
    trainer, _ = build()
    before = (trainer.lr_mult, trainer.wd_mult)
    with pytest.raises(ValueError, match=r"\['p0.weight'\]"):
        getattr(trainer, setter)({"p0.weight": value})
    assert (trainer.lr_mult, trainer.wd_mult) == before


@pytest.mark.parametrize("batch_size", [float("inf"), 0, -1, float("nan"), -float("inf"), True, "2"])
@pytest.mark.parametrize("method", ["step", "update"])
def test_bad_batch_sizes_are_refused_before_anything_changes(batch_size, method):
    trainer, params = build("sgd", momentum=0.9)
    train(trainer, params)
    gen = torch.Generator().manual_seed(7)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    before = snapshot(trainer, params)
    with pytest.raises(ValueError, match="batch_size="):
        getattr(trainer, method)(batch_size)
    assert_same(before, snapshot(trainer, params))
    # the same gradients are still fresh: a good step gives the numbers of a trainer that never saw the bad one
    trainer.step(2)
    twin, twin_params = build("sgd", momentum=0.9)
    train(twin, twin_params)
    for p, q in zip(params, twin_params):
        q.grad = p.grad.clone()
    twin.step(2)
    assert all(torch.equal(p, q) for p, q in zip(params, twin_params))


# ---------------------------------------------------------------------------------------------- file faults
def test_a_full_disk_is_an_oserror_naming_the_path_and_the_cause(saved, tmp_path, monkeypatch):
    trainer, params, path = saved
    good = path.read_bytes()

    def full(f, data):
        f.write(data[:100])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(_io, "_write_bytes", full)
    with pytest.raises(OSError) as info:
        trainer.save_states(path)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(path)
    assert str(path) in str(info.value) and "No space left on device" in str(info.value)
    assert "enforce fail" not in str(info.value)
    assert path.read_bytes() == good
    assert sorted(os.listdir(tmp_path)) == ["adam.states"]


def test_a_directory_as_the_path_says_so(saved, tmp_path):
    trainer, params, path = saved
    folder = tmp_path / "folder"
    folder.mkdir()
    with pytest.raises(IsADirectoryError, match="is a directory") as info:
        trainer.save_states(folder)
    assert info.value.filename == str(folder)
    with pytest.raises(IsADirectoryError, match="is a directory") as info:
        trainer.load_states(folder)
    assert info.value.filename == str(folder)
    assert sorted(os.listdir(tmp_path)) == ["adam.states", "folder"]


def test_a_missing_folder_and_a_missing_file_name_the_path(saved, tmp_path):
    trainer, _, _ = saved
    target = tmp_path / "nowhere" / "x.states"
    with pytest.raises(FileNotFoundError) as info:
        trainer.save_states(target)
    assert info.value.filename == str(target) and str(target) in str(info.value)
    with pytest.raises(FileNotFoundError, match="does not exist") as info:
        trainer.load_states(target)
    assert info.value.filename == str(target)


def test_a_read_only_folder_is_an_oserror_naming_the_path(saved, tmp_path, monkeypatch):
    trainer, _, _ = saved
    ro = tmp_path / "ro"
    ro.mkdir()
    target = ro / "x.states"
    if os.geteuid() != 0:  # root writes anywhere: then the read-only file system is simulated
        ro.chmod(0o500)
    else:
        def read_only(*args, **kwargs):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        monkeypatch.setattr(_io.tempfile, "mkstemp", read_only)
    try:
        with pytest.raises(OSError) as info:
            trainer.save_states(target)
    finally:
        ro.chmod(0o700)
    assert info.value.errno in (errno.EACCES, errno.EROFS) and info.value.filename == str(target)
    assert str(target) in str(info.value)
    assert os.listdir(ro) == []


def test_stale_temporary_files_are_removed_by_the_next_save(saved, tmp_path):
    trainer, _, path = saved
    stale = [tmp_path / "adam.states.k3j_9x0a.tmp", tmp_path / "adam.states.00000000.tmp"]
    kept = [tmp_path / "other.states.k3j_9x0a.tmp", tmp_path / "adam.states.tmp", tmp_path / "adam.states.x.tmp"]
    for f in stale + kept:
        f.write_bytes(b"half a checkpoint")
    trainer.save_states(path)
    assert sorted(os.listdir(tmp_path)) == sorted(["adam.states"] + [f.name for f in kept])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer.load_states(path)
    assert math.isfinite(trainer.learning_rate)
