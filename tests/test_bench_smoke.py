"""``python -m optzoo.bench`` at tiny sizes: every requested row is there with positive finite numbers,
the outputs are written, the workloads have their stated sizes, and the bytes-per-element convention
holds by closed form; the loaded workload's busy processes run during it and are gone after; the first
call runs cold and warm in fresh processes. No timing assertions."""
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from optzoo import bench
from optzoo.bench import load as L
from optzoo.bench import report as R
from optzoo.bench import timing as T
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
                     "small": (2000, 2_048_000, torch.float32), "fp16": (1, 16_777_216, torch.float16),
                     "loaded": (1, 16_777_216, torch.float32), "scheduled": (2000, 2_048_000, torch.float32)}
    assert W.make_workload("fp16").multi_precision
    assert W.make_workload("scheduled").scheduled and not W.make_workload("small").scheduled
    assert W.make_workload("loaded").loaded and not W.make_workload("single").loaded
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
    # the loaded workload: the default path only (--loaded-fused none)
    expected = [(o, w, m) for o in optimizers for w in W.WORKLOADS for m in ([None] if w == "loaded" else modes)]
    assert sorted(keys, key=str) == sorted(expected, key=str)
    for row in data["rows"]:
        assert "error" not in row, row
        assert row["finite"] is True
        _check_positive(row, ["first_ms", "ms", "gbps", "bytes", "vs_adam_gbps"])
        assert row["bytes"] == W.bytes_moved(row["optimizer"], W.make_workload(row["workload"], 1e-4))
        if row["workload"] not in ("fp16", "loaded", "scheduled"):
            _check_positive(row, ["peer_ms", "vs_peer"])
        if row["workload"] == "scheduled":  # paired with fused Adam under the same kind of schedule
            _check_positive(row, ["vs_adam_time", "ref_ms"])
        if row["workload"] == "loaded":  # paired with fused Adam under the same load
            _check_positive(row, ["vs_adam_time", "ref_ms"])
    loaded = data["workloads"]["loaded"]
    assert loaded["load"]["processes"] == os.cpu_count() == loaded["load"]["spinning_at_end"]
    for w in data["workloads"].values():
        _check_positive(w["baseline"], ["ms", "first_ms", "gbps"])
        assert w["control_ratio"] > 0  # torch's fused Adam paired against another instance of itself
        assert w["baseline"]["bytes_per_element"] == (14 if w["dtype"] == "float16" else 28)
    peers = {(p["optimizer"], p["workload"]): p for p in data["peers"]}
    assert set(peers) == {(o, w) for o in optimizers for w in ("single", "resnet50", "small")}
    assert {(p["class"], p["variant"]) for p in peers.values()} == {("Adam", "fused"), ("SGD", "fused")}
    _check_positive(data["triad"]["start"], ["gbps", "ms"])
    _check_positive(data["triad"]["end"], ["gbps", "ms"])
    # (i), (ii): GB/s vs Adam and time vs peer for each row; (iii) and scheduled: time vs Adam; loaded, fused=None:
    # time vs Adam; embedding: x dense and x peer time for each of its optimizers requested (adam, sgd)
    assert data["targets"]["checks"] == len(optimizers) * len(modes) * (2 * 2 + 2) + len(optimizers) * 3
    assert data["bytes_per_element"] == {"adam": {"float32": 28, "float16_mp": 30},
                                         "sgd": {"float32": 20, "float16_mp": 22}}
    md = (tmp_path / "latest.md").read_text()
    for w in data["workloads"].values():
        assert f"## {w['describe']}" in md
    assert "## Targets" in md and "| adam | None |" in md and "x Adam time" in md
    assert md.count("paired against another instance of itself: r = ") == len(data["workloads"])
    scheduled = md.split(f"## {data['workloads']['scheduled']['describe']}")[1].split("\n## ")[0]
    assert "| x Adam time |" in scheduled and "torch peer" not in scheduled  # its target's ratio, no peers
    out = capsys.readouterr().out
    assert "torch.optim.Adam(fused=True)" in out and "latest.json" in out and "under the same load" in out
    assert "with the same LambdaLR" in out
    # --render: the same reports again from the saved JSON, nothing measured
    assert bench.main(["--render", str(tmp_path / "latest.json"), "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "latest.md").read_text() == md
    # a GPU run's header (none here): the device and its copy bandwidth
    data["device"] = {"device": "cuda", "type": "cuda", "name": "H100", "memory_gib": 79.2, "multiprocessors": 132,
                      "cuda": "13.0"}
    data["copy"] = T.copy_bandwidth("cpu", nbytes=1 << 20, repeat=2)
    assert "device: cuda (H100, 79.2 GiB, 132 SMs, CUDA 13.0); copy dst.copy_(src), 1 MiB" in R.text_report(data)
    assert "- device: cuda (H100" in R.markdown_report(data)


def test_embedding_workload(tmp_path, capsys):
    """The row-sparse workload: per optimizer the lazy step, the dense step of the same table, torch's sparse peer
    (none for FTRL), and what one lazy step allocates (far below the table, as tests/test_sparse_cost.py checks)."""
    argv = ["--workloads", "embedding", "--scale", "1e-3", "--repeat", "2", "--out", str(tmp_path), "--mxnet", "none",
            "--quiet"]
    assert bench.main(argv) == 0
    data = json.loads((tmp_path / "latest.json").read_text())
    e = data["embedding"]
    assert (e["rows"], e["dim"], e["touched"], e["table_bytes"]) == (10_000, 64, 4, 10_000 * 64 * 4)
    assert data["workloads"] == {} and data["rows"] == []
    rows = {r["optimizer"]: r for r in e["results"]}
    assert list(rows) == ["sgd", "adam", "adagrad", "ftrl"]
    for label, r in rows.items():
        assert "error" not in r and r["finite"] is True, r
        _check_positive(r, ["ms", "first_ms", "dense_ms", "vs_dense"])
        assert 0 < r["alloc"]["peak"] < e["table_bytes"] / 10, r
        if label == "ftrl":
            assert r["peer"] is None and "vs_peer" not in r
        else:
            _check_positive(r, ["peer_ms", "vs_peer"])
    assert [r["peer"] for r in rows.values()] == ["torch.optim.SGD", "torch.optim.SparseAdam", "torch.optim.Adagrad",
                                                  None]
    assert data["targets"]["checks"] == 4 + 3  # x dense for each, x peer time where torch has a peer
    md = (tmp_path / "latest.md").read_text()
    assert f"## {e['describe']}" in md and "| sgd |" in md and "SparseAdam" in md
    assert "x dense" in capsys.readouterr().out
    assert bench.main(["--render", str(tmp_path / "latest.json"), "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "latest.md").read_text() == md


def test_bad_arguments():
    for argv in (["--workloads", "nope"], ["--fused", "maybe"], ["--optimizers", "nosuch"], ["--scale", "2"],
                 ["--optimizers", "adam:beta1"], ["--loaded-fused", "maybe"], ["--load-processes", "-1"],
                 ["--device", "nosuch"], ["--device", "meta"], ["--first-call", "int8"],
                 *([] if torch.cuda.is_available() else [["--device", "cuda"]])):
        with pytest.raises(SystemExit):
            bench.parse_args(argv)


def _running(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie has exited: only its parent's wait is missing
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
def test_busy_cores_spin_and_end_even_on_error():
    with pytest.raises(RuntimeError, match="boom"):
        with L.busy_cores(2, limit_s=60) as load:
            pids = load.pids
            assert load.processes == load.alive() == 2
            cpu = [_cpu_ticks(pid) for pid in pids]
            time.sleep(0.3)
            assert all(_cpu_ticks(pid) > c for pid, c in zip(pids, cpu))  # spinning, not sleeping
            raise RuntimeError("boom")
    assert not any(_running(pid) for pid in pids)
    with L.busy_cores(1, limit_s=0.2) as load:  # bounded: a spinner ends by itself after limit_s
        time.sleep(1.0)
        assert load.alive() == 0


def _cpu_ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def test_copy_bandwidth_and_device_sync_on_cpu():
    assert T.device_sync("cpu") is None
    copy = T.copy_bandwidth("cpu", nbytes=1 << 20, repeat=3)
    assert copy["bytes"] == 1 << 20 and copy["moved"] == 2 << 20 and copy["copies"] == 3
    _check_positive(copy, ["ms", "gbps", "best_gbps"])


def test_first_call_cold_and_warm(tmp_path, capsys):
    argv = ["--first-call", "--optimizers", "sgd", "--fused", "none", "--scale", "1e-3", "--out", str(tmp_path),
            "--quiet"]
    assert bench.main(argv) == 0
    data = json.loads((tmp_path / "first_call.json").read_text())
    (row,) = data["rows"]
    assert (row["optimizer"], row["fused"], row["dtype"]) == ("sgd", None, "float32")
    for key in ("cold", "warm"):
        assert row[key]["finite"] is True
        _check_positive(row, [f"{key}_s"])
        _check_positive(row[key], ["import_s", "startup_s", "second_s"])
    assert data["targets"]["checks"] == 2
    assert not (tmp_path / "latest.json").exists()
    out = capsys.readouterr().out
    assert "cold s" in out and "warm s" in out and "compiler start-up" in out and "first_call.json" in out


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
    for argv in (["--workloads", "single"], ["--optimizers", "adam"], ["--fused", "true"], ["--scale", "0.5"],
                 ["--loaded-fused", "true"]):
        assert parse_args(argv).out == "bench/results/partial", argv
    assert parse_args(["--scale", "0.5", "--out", "/elsewhere"]).out == "/elsewhere"


def test_ab_compares_this_tree_with_a_revision_in_one_process():
    """``bench/ab.py`` exports a git revision as ``optzoo_base`` beside this tree's ``optzoo`` and prints one
    line per workload and optimizer with three positive ratios (no timing assertions)."""
    if subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True).returncode != 0:
        pytest.skip("not a git checkout")
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "ab.py"), "--base", "HEAD", "--workloads", "mlp,mnist",
                          "--optimizers", "sgd,adam", "--rounds", "1"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line.split() for line in out.stdout.splitlines()[1:]]
    assert [r[:2] for r in rows] == [["mlp", "sgd"], ["mlp", "adam"], ["mnist", "sgd"], ["mnist", "adam"]]
    for r in rows:
        ratios = [float(r[3]), float(r[5].rstrip("x,")), float(r[7].rstrip("x"))]
        assert all(math.isfinite(x) and x > 0 for x in ratios), r


def test_gbps_limits_follow_the_issue():
    """Without a flag every optimizer is held to 0.8 x torch fused Adam's GB/s; compiled to 0.9, SGLD to 0.5."""
    from optzoo.bench.report import evaluate_targets
    rows = [{"workload": w, "optimizer": o, "fused": f, "vs_adam_gbps": v}
            for w in ("single", "resnet50")
            for o, f, v in (("adam", None, 0.85), ("adam", True, 0.85), ("sgld", True, 0.55), ("sgld", None, 0.55),
                            ("sgd", False, 0.1))]  # the reference path is not held to a target
    got = evaluate_targets(rows)
    assert got["checks"] == 8
    assert sorted((c["optimizer"], c["fused"], c["limit"]) for c in got["misses"]) == \
        [("adam", True, 0.9)] * 2 + [("sgld", None, 0.8)] * 2
    assert {c["text"] for c in got["misses"]} == {"GB/s >= 0.9 x torch fused Adam's", "GB/s >= 0.8 x torch fused Adam's"}


def test_mx_paths_runs_every_path_at_tiny_sizes():
    """``bench/mx_paths.py`` (the face, the Trainer and the Updater side by side) at a tiny scale: a table row per
    workload and optimizer, a positive finite ratio per path. No timing assertions."""
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "mx_paths.py"), "--workloads", "small,resnet50",
                          "--optimizers", "adam,sgd", "--rounds", "1", "--repeat", "2", "--scale", "1e-3"],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| small") or
            line.startswith("| resnet50")]
    assert [(r[0].strip(), r[1].strip()) for r in rows] == [("small", "adam"), ("small", "sgd"),
                                                            ("resnet50", "adam"), ("resnet50", "sgd")]
    for row in rows:
        for cell in row[2:]:
            ratio, gbps = cell.split()
            assert 0 < float(ratio) < math.inf and 0 < float(gbps.strip("()")) < math.inf
