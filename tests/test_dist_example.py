"""The example runs under torchrun with 2 workers and prints the same losses as one process."""
import re
import subprocess
import sys

from optzoo.examples import train

ARGS = ["--epochs", "2", "--batch-size", "64", "--param", "momentum=0.9"]


def _losses(text):
    return [(int(e), float(loss), float(acc)) for e, loss, acc in
            re.findall(r"^epoch (\d+) loss ([\d.]+) accuracy ([\d.]+)$", text, re.M)]


def test_torchrun_two_workers_print_the_losses_of_one_process(capsys):
    train.main(ARGS)
    single = _losses(capsys.readouterr().out)
    assert [e for e, *_ in single] == [1, 2] and single[1][1] < single[0][1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "optzoo.examples.train", "--kvstore", "dist_sync", "--timeout", "30"] + ARGS
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    dist = _losses(proc.stdout)
    assert [e for e, *_ in dist] == [1, 2], proc.stdout  # printed once (rank 0)
    for (_, l1, a1), (_, l2, a2) in zip(single, dist):
        assert abs(l1 - l2) <= 2e-6 * abs(l1) + 1e-6 and a1 == a2
    # 676 fp32 gradient elements per step, 16 steps per epoch
    assert f"bytes sent per worker: {676 * 4 * 16 * 2}" in proc.stdout
