"""``optzoo.mxnet``: MXNet 1.9.1 checkpoints read without MXNet, and training resumed with MXNet's numbers.

Fixtures: tests/fixtures/mxnet_import/ (recorded by tests/fixtures/record_mxnet_import.py in the MXNet side
venv). Per configuration MXNet trained K steps, saved params and trainer states, trained M more; optzoo loads
the K-step files and takes the M steps with MXNet's gradients.
"""
import contextlib
import importlib
import json
import os
import pathlib
import pickle
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

import optzoo
from optzoo import cli
from optzoo import mxnet as mxio

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "mxnet_import"
FORMATS = FIXTURES / "formats"
INDEX = json.loads((FIXTURES / "index.json").read_text())
CONFIGS = {c["name"]: c for c in INDEX["configs"]}


# ---------------------------------------------------------------------------------------------- load_params
@pytest.mark.parametrize("stem", ["dtypes", "list", "legacy", "gluon", "gluon-0000"])
def test_load_params_bit_equal_to_mxnet(stem):
    expected = np.load(FORMATS / "formats.npz")
    got = mxio.load_params(FORMATS / f"{stem}.params")
    keys = {k.split("/", 1)[1]: k for k in expected.files if k.startswith(stem + "/")}
    assert set(got) == set(keys)
    for name, key in keys.items():
        ref, t = expected[key], got[name]
        assert isinstance(t, torch.Tensor)
        assert tuple(t.shape) == ref.shape and t.numpy().dtype == ref.dtype, name
        assert t.numpy().tobytes() == ref.tobytes(), name


def test_load_params_every_dtype_and_shape():
    got = mxio.load_params(FORMATS / "dtypes.params")
    assert {k: v.dtype for k, v in got.items()} == {
        "f16": torch.float16, "f32": torch.float32, "f64": torch.float64, "i8": torch.int8, "i32": torch.int32,
        "i64": torch.int64, "u8": torch.uint8, "bool": torch.bool, "scalar": torch.float32,
        "empty": torch.float32, "f32_special": torch.float32}
    assert got["scalar"].shape == () and got["scalar"].item() == 1.25
    assert got["empty"].shape == (0, 3)
    assert got["i64"].tolist() == [-2**63, 2**63 - 1, 7]
    special = got["f32_special"]
    assert torch.isinf(special[:2]).all() and torch.isnan(special[2]) and str(special[3].item()) == "-0.0"
    # the tensors own their memory: writable, independent of each other
    got["f32"].add_(1)


def test_load_params_list_and_export_names():
    assert list(mxio.load_params(FORMATS / "list.params")) == ["0", "1"]
    exported = mxio.load_params(FORMATS / "gluon-0000.params")
    assert {k.split(":")[0] for k in exported} == {"arg", "aux"}
    assert [k for k in exported if k.startswith("aux:")] == ["aux:fmt_batchnorm0_running_mean",
                                                              "aux:fmt_batchnorm0_running_var"]


def test_name_map_onto_torch_state_dict():
    gluon = mxio.load_params(FORMATS / "gluon.params")
    assert mxio.name_map(gluon) == {
        "body.0.weight": "body.0.weight", "body.0.bias": "body.0.bias", "body.1.gamma": "body.1.weight",
        "body.1.beta": "body.1.bias", "body.1.running_mean": "body.1.running_mean",
        "body.1.running_var": "body.1.running_var", "body.4.weight": "body.4.weight",
        "body.4.bias": "body.4.bias", "emb.weight": "emb.weight"}
    exported = mxio.name_map(mxio.load_params(FORMATS / "gluon-0000.params"), prefix="fmt_")
    assert exported["arg:fmt_batchnorm0_gamma"] == "batchnorm0.weight"
    assert exported["aux:fmt_batchnorm0_running_var"] == "batchnorm0.running_var"
    assert exported["arg:fmt_dense0_weight"] == "dense0.weight"


def test_dense_weight_loads_into_linear_as_is():
    """A Gluon Dense weight is (units, in_units), as torch.nn.Linear's (out, in): no transpose."""
    gluon = mxio.load_params(FORMATS / "gluon.params")
    dense = torch.nn.Linear(18, 4)
    dense.load_state_dict({"weight": gluon["body.4.weight"], "bias": gluon["body.4.bias"]})
    conv = torch.nn.Conv2d(1, 2, 3)
    conv.load_state_dict({"weight": gluon["body.0.weight"], "bias": gluon["body.0.bias"]})


@pytest.mark.parametrize("cut", [0, 10, 23, 24, 40, 60, -1])
def test_truncated_params_file_is_a_value_error_naming_it(tmp_path, cut):
    data = (FORMATS / "gluon.params").read_bytes()
    bad = tmp_path / "bad.params"
    bad.write_bytes(data[:cut] if cut >= 0 else data[:-1])
    with pytest.raises(ValueError, match=r"bad\.params.*(truncated|damaged|header)"):
        mxio.load_params(bad)


@pytest.mark.parametrize("offset, value, match", [
    (24, b"\x00\x00\x00\x00", "magic"),          # first array's magic
    (28, b"\x05\x00\x00\x00", "storage type"),
    (32, b"\xff\x00\x00\x00", "dimensions"),
    (0, b"\x13", "not an MXNet NDArray file"),
])
def test_damaged_params_file(tmp_path, offset, value, match):
    data = bytearray((FORMATS / "gluon.params").read_bytes())
    data[offset:offset + len(value)] = value
    bad = tmp_path / "damaged.params"
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=match) as info:
        mxio.load_params(bad)
    assert "damaged.params" in str(info.value)


def test_trailing_bytes_and_missing_file(tmp_path):
    bad = tmp_path / "long.params"
    bad.write_bytes((FORMATS / "list.params").read_bytes() + b"\0")
    with pytest.raises(ValueError, match="long.params.*unexpected bytes"):
        mxio.load_params(bad)
    with pytest.raises(FileNotFoundError, match="nothere"):
        mxio.load_params(tmp_path / "nothere.params")
    with pytest.raises(ValueError, match="pickle"):
        mxio.load_params(FIXTURES / "nag" / "K.states")


# ---------------------------------------------------------------------------------------------- resume parity
def _optimizer_params(cfg):
    params = dict(cfg["optimizer_params"])
    if cfg["lr_scheduler"]:
        # any scheduler of the right class: the file's replaces it, state included
        params["lr_scheduler"] = getattr(optzoo.lr_scheduler, cfg["lr_scheduler"]["class"])(
            **cfg["lr_scheduler"]["kwargs"])
    return params


def _resumed_trainer(cfg, optimizer_params=None):
    folder = FIXTURES / cfg["name"]
    weights = mxio.load_params(folder / "K.params")
    # save_parameters names are structural ("0.weight"); the Trainer saw collect_params() names ("l0_weight")
    params = {name: torch.nn.Parameter(weights[name.replace("l", "").replace("_", ".", 1)].clone())
              for name in cfg["params"]}
    for name in cfg["frozen"]:
        params[name].requires_grad_(False)
    trainer = optzoo.Trainer(params, cfg["optimizer"], optimizer_params or {})
    mxio.load_trainer_states(trainer, folder / "K.states")
    return trainer, params


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_resume_reaches_mxnets_weights(name):
    cfg = CONFIGS[name]
    # built with other hyperparameters (the defaults): the file's replace them
    trainer, params = _resumed_trainer(cfg)
    assert trainer.optimizer.num_update == INDEX["K"]
    after = np.load(FIXTURES / name / "after.npz")
    for s in range(INDEX["M"]):
        for n, p in params.items():
            if p.requires_grad:
                p.grad = torch.from_numpy(after[f"grad{s}/{n}"]).clone()
        trainer.step(INDEX["batch_size"])
    assert trainer.optimizer.num_update == INDEX["K"] + INDEX["M"]
    for n, p in params.items():
        # measured bit-exact for every configuration (fp32, fp16 with fp32 master weights, two devices)
        assert torch.equal(p.detach(), torch.from_numpy(after[f"final/{n}"])), n
    for n in cfg["frozen"]:
        ref = mxio.load_params(FIXTURES / name / "K.params")[n.replace("l", "").replace("_", ".", 1)]
        assert torch.equal(params[n].detach(), ref)


def test_resume_restores_hyperparameters_counts_and_scheduler():
    cfg = CONFIGS["sgd_momentum_wd"]
    trainer, _ = _resumed_trainer(cfg)
    opt = trainer.optimizer
    assert (opt.momentum, opt.wd) == (0.9, 1e-3)
    assert opt._all_index_update_counts == {0: {0: 3, 1: 3, 2: 3, 3: 3}}
    sched = opt.lr_scheduler
    assert type(sched) is optzoo.lr_scheduler.FactorScheduler and sched.count == 2 and sched.base_lr == 0.05
    two = _resumed_trainer(CONFIGS["sgd_two_devices_frozen"])[0].optimizer
    assert two._all_index_update_counts == {0: {1: 3, 2: 3, 3: 3}, 1: {1: 3, 2: 3, 3: 3}}
    assert two._current_context == 1
    mp = _resumed_trainer(CONFIGS["sgd_fp16_mp"])[0]
    assert mp.optimizer.multi_precision
    state = mp._updater.states[0]
    assert [t.dtype for t in state] == [torch.float32, torch.float32]   # (momentum, fp32 master weight)


def test_multipliers_stay_the_trainers():
    cfg = CONFIGS["adagrad"]
    folder = FIXTURES / cfg["name"]
    params = {n: torch.nn.Parameter(torch.zeros(s)) for n, s in cfg["params"].items()}
    trainer = optzoo.Trainer(params, "adagrad")
    trainer.set_lr_mult({"l0_weight": 0.5})
    mxio.load_trainer_states(trainer, folder / "K.states")
    assert trainer.lr_mult["l0_weight"] == 0.5
    assert trainer.optimizer.lr == 0.05


def test_trainer_refuses_other_optimizer_or_shapes_unchanged():
    cfg = CONFIGS["nag"]
    params = {n: torch.nn.Parameter(torch.zeros(s)) for n, s in cfg["params"].items()}
    trainer = optzoo.Trainer(params, "adam")
    before = trainer.optimizer
    with pytest.raises(ValueError, match=r"K\.states.*NAG.*optimizer='nag'"):
        mxio.load_trainer_states(trainer, FIXTURES / "nag" / "K.states")
    wrong = {n: torch.nn.Parameter(torch.zeros(tuple(d + 1 for d in s))) for n, s in cfg["params"].items()}
    trainer = optzoo.Trainer(wrong, "nag")
    before = trainer.optimizer
    with pytest.raises(ValueError, match=r"K\.states.*index 0.*shape"):
        mxio.load_trainer_states(trainer, FIXTURES / "nag" / "K.states")
    assert trainer.optimizer is before
    few = dict(list(params.items())[:2])
    with pytest.raises(ValueError, match="index 2.*2 parameters"):
        mxio.load_trainer_states(optzoo.Trainer(few, "nag"), FIXTURES / "nag" / "K.states")


# ---------------------------------------------------------------------------------------------- Updater bytes
def _states_bytes(name, dump_optimizer):
    """``Updater.get_states(dump_optimizer)`` bytes: ``Trainer.save_states`` writes those with the optimizer."""
    return (FIXTURES / name / ("K.states" if dump_optimizer else "K.updater_states")).read_bytes()


@pytest.mark.parametrize("dump_optimizer", [True, False])
def test_updater_states_with_and_without_optimizer(dump_optimizer):
    blob = _states_bytes("adam_clip", dump_optimizer)
    if not dump_optimizer:
        assert b"Adam" not in blob and b"mxnet.ndarray.ndarray" in blob
    opt = optzoo.create("adam", learning_rate=0.5)
    updater = optzoo.get_updater(opt)
    mxio.load_updater_states(updater, blob)
    assert sorted(updater.states) == [0, 1, 2, 3]
    ref = mxio.read_states(FIXTURES / "adam_clip" / "K.states").states
    for i, s in updater.states.items():
        assert all(torch.equal(a, b) for a, b in zip(s, ref[i]))
    if dump_optimizer:
        assert updater.optimizer is not opt and updater.optimizer.clip_gradient == 0.5
        assert updater.optimizer.num_update == 3
    else:
        assert updater.optimizer is opt and opt.lr == 0.5
    # a path works as well as bytes
    mxio.load_updater_states(optzoo.get_updater(optzoo.create("adam")), FIXTURES / "adam_clip" / "K.states")


def test_updater_refuses_states_of_another_layout():
    updater = optzoo.get_updater(optzoo.create("sgd", momentum=0.9))
    with pytest.raises(ValueError, match="MXNet states bytes.*layout"):
        mxio.load_updater_states(updater, _states_bytes("rmsprop_centered", False))
    assert updater.states == {}


# ---------------------------------------------------------------------------------------------- refusals
class _Call:
    """Pickles as a call of ``func(*args)``: what a malicious states file would hold."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _evil_payloads(marker):
    cmd = f"touch {marker}"
    return {
        "os.system": _Call(os.system, cmd),
        "eval": _Call(eval, f"open({str(marker)!r}, 'w').close()"),
        "builtins.exec": _Call(exec, f"open({str(marker)!r}, 'w').close()"),
        "subprocess": _Call(subprocess.call, ["touch", str(marker)]),
        "importlib": _Call(importlib.import_module, "os"),
    }


@pytest.mark.parametrize("where", ["in a state", "in the optimizer", "as the whole file"])
@pytest.mark.parametrize("kind", ["os.system", "eval", "builtins.exec", "subprocess", "importlib"])
def test_states_that_would_run_code_are_refused(tmp_path, where, kind):
    marker = tmp_path / "ran"
    payload = _evil_payloads(marker)[kind]

    class Optimizer:  # stands for an MXNet optimizer whose __dict__ carries the payload
        def __reduce__(self):
            return (_OptimizerGlobal, (), {"lr": 0.1, "evil": payload, "momentum": 0.0})

    if where == "in a state":
        obj = ({0: (payload,)}, Optimizer())
    elif where == "in the optimizer":
        obj = ({}, Optimizer())
    else:
        obj = payload
    path = tmp_path / "evil.states"
    with _fake_mxnet():
        path.write_bytes(pickle.dumps(obj, protocol=2))
    params = {"w": torch.nn.Parameter(torch.zeros(2))}
    with pytest.raises(ValueError, match=r"evil\.states.*refers to .*(system|eval|exec|call|import_module).*refused"):
        mxio.load_trainer_states(optzoo.Trainer(params, "nag"), path)
    with pytest.raises(ValueError, match="refused"):
        mxio.load_updater_states(optzoo.get_updater(optzoo.create("nag")), path.read_bytes())
    assert not marker.exists()


class _OptimizerGlobal:
    """Pickled by reference as ``mxnet.optimizer.optimizer.NAG`` (see ``_fake_mxnet``)."""


@contextlib.contextmanager
def _fake_mxnet():
    """Modules named as MXNet's for the time of ``pickle.dumps``, so that a stand-in class pickles as MXNet's
    ``NAG`` (the pickler checks that the name imports to the same object); removed afterwards."""
    names = ["mxnet", "mxnet.optimizer", "mxnet.optimizer.optimizer"]
    assert not any(n in sys.modules for n in names)
    module = types.ModuleType(names[-1])
    module.NAG = _OptimizerGlobal
    saved = (_OptimizerGlobal.__module__, _OptimizerGlobal.__qualname__)
    _OptimizerGlobal.__module__, _OptimizerGlobal.__qualname__ = names[-1], "NAG"
    sys.modules.update({n: types.ModuleType(n) for n in names[:-1]}, **{names[-1]: module})
    try:
        yield
    finally:
        for n in names:
            del sys.modules[n]
        _OptimizerGlobal.__module__, _OptimizerGlobal.__qualname__ = saved


def test_unknown_attributes_and_damaged_states(tmp_path):
    data = (FIXTURES / "nag" / "K.states").read_bytes()
    for cut in (1, 100, len(data) // 2, len(data) - 1):
        bad = tmp_path / f"cut{cut}.states"
        bad.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=rf"cut{cut}\.states.*(truncated|damaged)"):
            mxio.read_states(bad)
    bad = tmp_path / "params.states"
    bad.write_bytes((FORMATS / "list.params").read_bytes())
    with pytest.raises(ValueError, match="params.states.*not an MXNet states pickle"):
        mxio.read_states(bad)
    # a damaged NDArray record inside the pickle
    i = data.index(b"\xc9\xfa\x93\xf9")
    bad = tmp_path / "ndarray.states"
    bad.write_bytes(data[:i] + b"\0\0\0\0" + data[i + 4:])
    with pytest.raises(ValueError, match="ndarray.states.*magic"):
        mxio.read_states(bad)
    # an optimizer attribute optzoo does not know: not MXNet 1.9.1's NAG
    odd = tmp_path / "odd.states"

    class Opt:
        def __reduce__(self):
            return (_OptimizerGlobal, (), {"lr": 0.1, "momentum": 0.0, "frobnicate": 1})
    with _fake_mxnet():
        odd.write_bytes(pickle.dumps(({}, Opt())))
    with pytest.raises(ValueError, match="odd.states.*'frobnicate'"):
        mxio.load_trainer_states(optzoo.Trainer({"w": torch.nn.Parameter(torch.zeros(2))}, "nag"), odd)


def test_plain_pickle_would_run_these_payloads(tmp_path):
    """The refused files are live: ``pickle.loads`` of the same bytes runs the payload."""
    marker = tmp_path / "ran"
    data = pickle.dumps(_evil_payloads(marker)["eval"], protocol=2)
    pickle.loads(data)
    assert marker.exists()


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_import_then_resume_with_optzoo_files(tmp_path, capsys):
    cfg = CONFIGS["sgd_momentum_wd"]
    folder = FIXTURES / cfg["name"]
    out = tmp_path / "ckpt.pt"
    assert cli.main(["import-mxnet", str(folder / "K.params"), str(folder / "K.states"), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    for word in ("0.weight", "8x6", "float32", "SGD", "momentum=0.9", "FactorScheduler", "num_update: 3"):
        assert word in text, word
    weights = torch.load(out, weights_only=True)
    assert set(weights) == {"0.weight", "0.bias", "1.weight", "1.bias"}
    params = {n: torch.nn.Parameter(t) for n, t in weights.items()}
    trainer = optzoo.Trainer(params, "sgd")
    trainer.load_states(tmp_path / "ckpt.states")
    after = np.load(folder / "after.npz")
    gluon = {n: n.replace("l", "").replace("_", ".", 1) for n in cfg["params"]}
    for s in range(INDEX["M"]):
        for g, n in gluon.items():
            params[n].grad = torch.from_numpy(after[f"grad{s}/{g}"]).clone()
        trainer.step(INDEX["batch_size"])
    for g, n in gluon.items():
        assert torch.equal(params[n].detach(), torch.from_numpy(after[f"final/{g}"])), n


def test_cli_params_only(tmp_path, capsys):
    out = tmp_path / "w.pt"
    assert cli.main(["import-mxnet", str(FORMATS / "gluon-0000.params"), "--out", str(out)]) == 0
    weights = torch.load(out, weights_only=True)
    assert "fmt_batchnorm0_running_var" in weights and not (tmp_path / "w.states").exists()
    assert "fmt_dense0_weight" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["nothere.params", "--out", "{tmp}/o.pt"], "PARAMS='nothere.params': no such file"),
    (["{fmt}/list.params", "nothere.states", "--out", "{tmp}/o.pt"], "STATES='nothere.states': no such file"),
    (["{fmt}/list.params"], "--out"),
    (["{fmt}/list.params", "--out", "{tmp}/o.pt", "--states-out", "{tmp}/s"], "--states-out without STATES"),
    (["{fmt}/list.params", "--out", "{tmp}/no/such/dir/o.pt"], "existing folder"),
    (["{fmt}/list.params", "--out", "{tmp}/o.pt", "--order", "random"], "--order"),
    (["{tmp}/bad.params", "--out", "{tmp}/o.pt"], "bad.params.*truncated"),
    (["{nag}/K.params", "{tmp}/evil.states", "--out", "{tmp}/o.pt"], "evil.states.*refused"),
    (["{nag}/K.params", "{nag}/K.updater_states", "--out", "{tmp}/o.pt"], "holds no optimizer"),
    (["{fmt}/list.params", "{nag}/K.states", "--out", "{tmp}/o.pt"], "K.states.*index"),
])
def test_cli_bad_arguments_exit_2(tmp_path, capsys, args, message):
    (tmp_path / "bad.params").write_bytes((FORMATS / "list.params").read_bytes()[:30])
    (tmp_path / "evil.states").write_bytes(pickle.dumps(_Call(os.system, f"touch {tmp_path}/ran")))
    args = [a.format(tmp=tmp_path, fmt=FORMATS, nag=FIXTURES / "nag") for a in args]
    with pytest.raises(SystemExit) as info:
        cli.main(["import-mxnet", *args])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert __import__("re").search(message, err.replace("\n", " ")), err
    assert not (tmp_path / "o.pt").exists() and not (tmp_path / "ran").exists()
