"""``python -m optzoo.bench`` at tiny sizes: every requested row is there with positive finite numbers,
the outputs are written, the workloads have their stated sizes, and the bytes-per-element convention
holds by closed form. No timing assertions."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from optzoo import bench
from optzoo.bench import workloads as W

ROOT = Path(__file__).resolve().parents[1]
MXNET = ROOT / ".mxref" / "bin" / "python"


def test_resnet50_shapes():
    shapes = W.resnet50_shapes()
    assert len(shapes) == 161
    assert sum(math.prod(s) for s in shapes) == 25_557_032
    dims = [len(s) for s in shapes]
    assert dims.count(4) == 53                      # 1 stem + 16 x 3 bottleneck + 4 downsample convs, no bias
    assert dims.count(1) == 2 * 53 + 1              # a weight and a bias per bn, the fc bias
    assert shapes[-2:] == [(1000, 2048), (1000,)]


def test_workload_sizes():
    sizes = {k: (len(W.make_workload(k).shapes), W.make_workload(k).numel, W.make_workload(k).dtype)
             for k in W.WORKLOADS}
    assert sizes == {"single": (1, 16_777_216, torch.float32), "resnet50": (161, 25_557_032, torch.float32),
                     "small": (2000, 2_048_000, torch.float32), "fp16": (1, 16_777_216, torch.float16)}
    assert W.make_workload("fp16").multi_precision
    tiny = W.make_workload("resnet50", 1e-4)
    assert len(tiny.shapes) == 161 and tiny.numel < 25_557_032 * 2e-4


def test_bytes_per_element_closed_form():
    # adam fp32: w r/w 8 + g 4 + m r/w 8 + v r/w 8
    assert W.bytes_per_element("adam") == 28
    # fp16 + multi_precision: w16 r/w 4 + g16 2 + fp32 master r/w 8 + m 8 + v 8
    assert W.bytes_per_element("adam", torch.float16, True) == 30
    # sgd, momentum 0.9 (the benchmark's setting): w 8 + g 4 + mom 8; without momentum no state
    assert W.bytes_per_element("sgd") == 20
    assert W.bytes_per_element("sgd", settings={"momentum": 0.0}) == 12
    # adagrad keeps an fp32 history for fp16 weights: 4 + 2 + master 8 + history 8
    assert W.bytes_per_element("adagrad", torch.float16, True) == 22
    # groupadagrad: one fp32 history per row of a 4096 x 4096 weight
    assert W.bytes_per_element("groupadagrad") == 12 + 2 * 4 * 4096 / 4096 ** 2


def _check_positive(entry, keys):
    for key in keys:
        value = entry[key]
        assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (key, entry)


def test_smoke_run(tmp_path, capsys):
    optimizers, modes = ["adam", "sgd"], [None, True]
    argv = ["--scale", "1e-4", "--repeat", "2", "--optimizers", ",".join(optimizers),
            "--fused", "none,true", "--out", str(tmp_path), "--mxnet", "none", "--quiet"]
    assert bench.main(argv) == 0
    data = json.loads((tmp_path / "latest.json").read_text())
    assert set(data["workloads"]) == set(W.WORKLOADS)
    keys = [(r["optimizer"], r["workload"], r["fused"]) for r in data["rows"]]
    assert sorted(keys, key=str) == sorted([(o, w, m) for o in optimizers for w in W.WORKLOADS for m in modes],
                                           key=str)
    for row in data["rows"]:
        assert "error" not in row, row
        assert row["finite"] is True
        _check_positive(row, ["first_ms", "ms", "gbps", "bytes", "vs_adam_gbps"])
        assert row["bytes"] == W.bytes_moved(row["optimizer"], W.make_workload(row["workload"], 1e-4))
        if row["workload"] != "fp16":
            _check_positive(row, ["peer_ms", "vs_peer"])
    for w in data["workloads"].values():
        _check_positive(w["baseline"], ["ms", "first_ms", "gbps"])
        assert w["baseline"]["bytes_per_element"] == (14 if w["dtype"] == "float16" else 28)
    peers = {(p["optimizer"], p["workload"]): p for p in data["peers"]}
    assert set(peers) == {(o, w) for o in optimizers for w in ("single", "resnet50", "small")}
    assert {(p["class"], p["variant"]) for p in peers.values()} == {("Adam", "fused"), ("SGD", "fused")}
    _check_positive(data["triad"]["start"], ["gbps", "ms"])
    _check_positive(data["triad"]["end"], ["gbps", "ms"])
    # (i), (ii): GB/s vs Adam and time vs peer for each row; (iii): time vs Adam
    assert data["targets"]["checks"] == len(optimizers) * len(modes) * (2 * 2 + 1)
    assert data["bytes_per_element"] == {"adam": {"float32": 28, "float16_mp": 30},
                                         "sgd": {"float32": 20, "float16_mp": 22}}
    md = (tmp_path / "latest.md").read_text()
    for w in data["workloads"].values():
        assert f"## {w['describe']}" in md
    assert "## Targets" in md and "| adam | None |" in md
    out = capsys.readouterr().out
    assert "torch.optim.Adam(fused=True)" in out and "latest.json" in out
    # --render: the same reports again from the saved JSON, nothing measured
    assert bench.main(["--render", str(tmp_path / "latest.json"), "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "latest.md").read_text() == md


def test_bad_arguments():
    for argv in (["--workloads", "nope"], ["--fused", "maybe"], ["--optimizers", "nosuch"], ["--scale", "2"],
                 ["--optimizers", "adam:beta1"]):
        with pytest.raises(SystemExit):
            bench.parse_args(argv)


def test_module_entry_point():
    proc = subprocess.run([sys.executable, "-m", "optzoo.bench", "--help"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and "--workloads" in proc.stdout


@pytest.mark.skipif(not MXNET.exists(), reason="MXNet 1.9.1 side venv (.mxref) not present")
def test_mxnet_subprocess(tmp_path):
    argv = ["--scale", "1e-4", "--repeat", "2", "--optimizers", "adam,groupadagrad",
            "--workloads", "single,fp16", "--fused", "none", "--out", str(tmp_path), "--mxnet", str(MXNET), "--quiet"]
    assert bench.main(argv) == 0
    data = json.loads((tmp_path / "latest.json").read_text())
    assert data["mxnet"]["version"] == "1.9.1"
    for row in data["rows"]:
        _check_positive(row["mxnet"], ["ms", "first_ms"])
        _check_positive(row, ["vs_mxnet"])


def test_a_partial_run_never_overwrites_the_full_results():
    parse_args = bench.parse_args
    assert parse_args([]).out == "bench/results"
    for argv in (["--workloads", "single"], ["--optimizers", "adam"], ["--fused", "true"], ["--scale", "0.5"]):
        assert parse_args(argv).out == "bench/results/partial", argv
    assert parse_args(["--scale", "0.5", "--out", "/elsewhere"]).out == "/elsewhere"
