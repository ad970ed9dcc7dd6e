"""Every bad argument of the command lines ends with exit status 2 and one line naming it, before any work
starts (issue 12): ``optzoo demo``, ``optzoo bench`` / ``python -m optzoo.bench`` and the example.

The cases the issue names run as real processes; the others (marked ``IN``) call the same ``main`` in this
process (about 5 s of imports saved each)."""
import json
import subprocess
import sys

import pytest

from optzoo import cli
from optzoo.examples import train

IN = "in-process"

DEMO = [sys.executable, "-m", "optzoo", "demo"]
BENCH = [sys.executable, "-m", "optzoo", "bench"]
EXAMPLE = [sys.executable, "-m", "optzoo.examples.train"]


def run(argv, cwd):
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=cwd)


class _Proc:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def call(main, argv, capsys):
    """``main(argv)`` in this process, as a finished process: its exit status and output."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    out = capsys.readouterr()
    return _Proc(info.value.code, out.out, out.err)


def assert_usage_error(proc, *named):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert ": error: " in last, proc.stderr
    for text in named:
        assert text in last, (text, last)
    assert proc.stdout == ""  # nothing measured, trained or printed


@pytest.mark.parametrize("argv,named,how", [
    (["--seed", "18446744073709551616"], ["--seed", "18446744073709551616"], "process"),
    (["--seed", "-1"], ["--seed"], IN),
    (["--epochs", "99999999999999999999"], ["--epochs"], IN),
])
def test_demo(tmp_path, argv, named, how, capsys):
    argv = argv + ["--out", str(tmp_path / "out")]
    proc = run(DEMO + argv, tmp_path) if how != IN else call(cli.main, ["demo"] + argv, capsys)
    assert_usage_error(proc, *named)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv,named,how", [
    (["--optimizers", "adam:beta1=2"], ["--optimizers", "adam:beta1=2", "beta1=2"], "process"),
    (["--optimizers", "sgd,adam:bogus=2"], ["--optimizers", "adam:bogus=2", "bogus"], "process"),
    (["--budget", "nan"], ["--budget nan"], "process"),
    (["--render", "missing.json"], ["--render", "missing.json"], "process"),
    (["--scale", "nan"], ["--scale"], IN),
    (["--tries", "0"], ["--tries 0"], IN),
    (["--render", "notjson.json"], ["--render", "not JSON"], IN),
    (["--render", "other.json"], ["--render", "not a benchmark result"], IN),
    (["--readme", "missing.md"], ["--readme", "missing.md"], IN),
])
def test_bench(tmp_path, argv, named, how, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notjson.json").write_text("{")
    (tmp_path / "other.json").write_text(json.dumps({"schema": "something else"}))
    argv = argv + ["--out", str(tmp_path / "out")]
    proc = run(BENCH + argv, tmp_path) if how != IN else call(cli.main, ["bench"] + argv, capsys)
    assert_usage_error(proc, *named)
    assert not (tmp_path / "out").exists()


def test_bench_module_entry_point(tmp_path):
    proc = run([sys.executable, "-m", "optzoo.bench", "--optimizers", "adam:beta1=2"], tmp_path)
    assert_usage_error(proc, "--optimizers", "beta1=2")


@pytest.mark.parametrize("argv,named,how", [
    (["--optimizer", "nosuch"], ["--optimizer 'nosuch'", "nosuch"], "process"),
    (["--param", "momentum=abc"], ["momentum='abc'"], "process"),
    (["--batch-size", "0"], ["--batch-size", "'0'"], "process"),
    (["--kvstore", "dist_sync", "--compression", "2bit:abc"], ["--compression '2bit:abc'", "'abc'"], "process"),
    (["--kvstore", "bogus"], ["--kvstore 'bogus'"], "process"),
    (["--epochs", "-1"], ["--epochs", "'-1'"], "process"),
    (["--param", "nosuch=1"], ["nosuch"], IN),
    (["--param", "momentum"], ["--param 'momentum'", "KEY=VALUE"], IN),
    (["--lr", "nan"], ["learning_rate=nan"], IN),
    (["--epochs", "0"], ["--epochs", "'0'"], IN),
    (["--timeout", "-5"], ["--timeout"], IN),
    (["--kvstore", "nccl"], ["--kvstore 'nccl'"], IN),
    (["--kvstore", "dist_sync", "--compression", "2bit:-1"], ["--compression '2bit:-1'"], IN),
    (["--kvstore", "dist_sync", "--compression", "3bit"], ["--compression '3bit'"], IN),
    (["--compression", "2bit:0.5"], ["--compression", "dist kvstore"], IN),
])
def test_example(tmp_path, argv, named, how, capsys):
    proc = run(EXAMPLE + argv, tmp_path) if how != IN else call(train.main, argv, capsys)
    assert_usage_error(proc, *named)


def test_example_param_values_read_python_and_json_spellings():
    """``--param centered=False`` is the bool False (it used to be the string 'False', which read as True)."""
    from optzoo.examples.train import _value
    assert _value("False") is False and _value("false") is False and _value("True") is True
    assert _value("None") is None and _value("null") is None
    assert _value("0.9") == 0.9 and _value("abc") == "abc"
