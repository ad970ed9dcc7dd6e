"""The ``optzoo`` command line: ``list``, ``bench`` pass-through, bad arguments, the missing-extra message.

The end-to-end demo run is in test_demo.py.
"""
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import optzoo
from optzoo import cli, optimizer

SRC = str(Path(optzoo.__file__).resolve().parents[1])


def run_cli(*args, timeout=120):
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "optzoo", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


# ---------------------------------------------------------------------------------------------- list
def test_list_names_every_optimizer_with_description_and_defaults(capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    for r in optimizer.records():
        head = next(i for i, line in enumerate(lines) if line.startswith(r.name + ":") or
                    line.startswith(r.name + " (also"))
        assert (r.description or "(no description)") in lines[head]
        if r.cls.__module__.startswith("optzoo.optimizer."):
            assert r.description   # every built-in one has its one-line description
        for alias in r.aliases:
            assert alias in lines[head]
        defaults = lines[head + 1]
        assert defaults.startswith("    defaults: ")
        for k, v in r.defaults().items():
            assert f"{k}={v!r}" in defaults
    assert sum(1 for line in lines if line.startswith("    defaults: ")) == len(optimizer.records())


def test_list_shows_mxnet_defaults(capsys):
    """A few of MXNet 1.9.1's documented defaults, written out independently of the registry."""
    cli.main(["list"])
    lines = capsys.readouterr().out.splitlines()

    def defaults(name):
        i = next(i for i, line in enumerate(lines) if line.split(":")[0].split(" ")[0] == name)
        return lines[i + 1]
    assert "learning_rate=0.001, beta1=0.9, beta2=0.999, epsilon=1e-08" in defaults("adam")
    assert "rho=0.9, epsilon=1e-05" in defaults("adadelta")
    assert "lamda1=0.01, learning_rate=0.1, beta=1" in defaults("ftrl")
    assert "momentum=0.0" in defaults("sgd")
    assert "learning_rate=None" in lines[0] and "wd=0.0" in lines[0]   # the shared Optimizer arguments


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 2
    assert "demo" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- bench
def test_bench_passes_its_arguments_through(monkeypatch):
    import optzoo.bench
    seen = []
    monkeypatch.setattr(optzoo.bench, "main", lambda argv=None: seen.append(argv) or 7)
    assert cli.main(["bench", "--workloads", "single", "--optimizers", "adam", "--help"]) == 7
    assert seen == [["--workloads", "single", "--optimizers", "adam", "--help"]]


def test_bench_help_is_the_benchmarks(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--workloads" in out and "--fused" in out


# ---------------------------------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize("args, flag", [
    (["--optimizers", "sgd,nosuch"], "--optimizers"),
    (["--optimizers", " , "], "--optimizers"),
    (["--epochs", "-1"], "--epochs"),
    (["--epochs", "0"], "--epochs"),
    (["--epochs", "two"], "--epochs"),
    (["--seed", "-3"], "--seed"),
    (["--batch-size", "0"], "--batch-size"),
    (["--trajectory-steps", "0"], "--trajectory-steps"),
    (["--device", "nosuchdevice"], "--device"),
    (["--device", "meta"], "--device"),
    (["--fused", "maybe"], "--fused"),
])
def test_bad_demo_argument_names_it(args, flag, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "--out", str(tmp_path / "out"), *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and "error" in err
    assert not (tmp_path / "out").exists()   # nothing written before the arguments are all checked


def test_cuda_device_without_cuda_is_a_clear_error(capsys, tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "--device", "cuda", "--out", str(tmp_path)])
    assert e.value.code == 2 and "--device='cuda'" in capsys.readouterr().err


def test_unknown_optimizer_exits_nonzero_without_traceback(tmp_path):
    r = run_cli("demo", "--out", str(tmp_path), "--optimizers", "sgd,nosuch")
    assert r.returncode == 2
    assert "--optimizers" in r.stderr and "'nosuch'" in r.stderr and "adam" in r.stderr
    assert "Traceback" not in r.stderr


def test_unwritable_out_exits_nonzero_without_traceback(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    r = run_cli("demo", "--optimizers", "sgd", "--epochs", "1", "--out", str(blocker / "out"))
    assert r.returncode == 2
    assert "--out=" in r.stderr and "cannot write there" in r.stderr
    assert "Traceback" not in r.stderr


def test_missing_demo_extra_is_a_clear_message(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # import matplotlib -> ImportError
    assert cli.main(["demo", "--optimizers", "sgd", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "pip install 'optzoo[demo]'" in err and "matplotlib" in err


def test_list_into_a_closed_pipe_ends_quietly():
    """`optzoo list | head -1`: the reader leaves early; no BrokenPipeError traceback."""
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = f"{shlex.quote(sys.executable)} -m optzoo list | head -1"
    proc = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, env=env, timeout=60)
    assert proc.stdout.startswith("Every optimizer")
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr
