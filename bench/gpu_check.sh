#!/usr/bin/env bash
# The CUDA check, on a machine with an NVIDIA GPU, in under 8 minutes:
#   1. optzoo importable in $PYTHON (which must already hold torch with CUDA): `pip install -e .` offline if
#      it is not, else this checkout's src/ on PYTHONPATH;
#   2. the CUDA tests (`pytest -k cuda` over the test files that have any; each is skipped without CUDA);
#   3. the benchmark on the GPU (`python -m optzoo.bench --device cuda`), then per optimizer and mode its
#      GB/s, x torch fused Adam's GB/s (paired), and the share of the device's copy bandwidth
#      (`dst.copy_(src)` of 256 MiB, CUDA events, GB/s = 2 x bytes / time).
# Every step runs under `timeout`; the script exits non-zero if any step fails or times out.
#
#   bash bench/gpu_check.sh                       # PYTHON=python3
#   PYTHON=/opt/torch/.venv/bin/python3 BENCH_ARGS="--workloads single,resnet50" bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
# The default bench run fits the 8 minutes on a cold machine: every fused=True row compiles (Triton) on first use.
BENCH_ARGS=${BENCH_ARGS:---workloads single --fused none,true --budget 0.5}
BENCH_OUT=${BENCH_OUT:-bench/results/partial/$DEVICE}
# seconds per step: 430 in all with the summary's 30, 475 if every step also needs its SIGKILL (-k) grace
T_CHECK=${T_CHECK:-40} T_INSTALL=${T_INSTALL:-40} T_TESTS=${T_TESTS:-100} T_BENCH=${T_BENCH:-220}
export PYTHONUNBUFFERED=1

status=0
fail() { echo "gpu_check: FAILED: $*" >&2; status=1; }
step() { echo; echo "=== gpu_check [$SECONDS s]: $*"; }

step "torch and $DEVICE in $PYTHON"
if ! timeout -k 10 "$T_CHECK" "$PYTHON" - "$DEVICE" <<'EOF'
import sys
import torch
device = torch.device(sys.argv[1])
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, available: {torch.cuda.is_available()}")
if device.type == "cuda" and not torch.cuda.is_available():
    sys.exit(f"no CUDA device visible to torch {torch.__version__}")
torch.zeros(1, device=device)
if device.type == "cuda":
    print(torch.cuda.get_device_name(device))
EOF
then
    fail "$PYTHON cannot use torch on $DEVICE"
    exit 1
fi

step "optzoo importable"
if ! "$PYTHON" -c "import optzoo" 2>/dev/null; then
    # offline: no index, no build isolation (the setuptools already there), no dependencies (torch is there)
    if timeout -k 10 "$T_INSTALL" "$PYTHON" -m pip install -q --no-index --no-build-isolation --no-deps -e . \
        && "$PYTHON" -c "import optzoo" 2>/dev/null; then
        echo "installed with pip install -e ."
    else
        echo "pip install -e . failed or is unavailable offline: using $PWD/src on PYTHONPATH"
        export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
    fi
fi
if ! "$PYTHON" -c "import optzoo, sys; print('optzoo', optzoo.__version__, 'from', optzoo.__file__)"; then
    fail "optzoo is not importable"
    exit 1
fi

step "CUDA tests"
mapfile -t files < <(grep -l -i "cuda" tests/test_*.py)
if ! "$PYTHON" -c "import pytest" 2>/dev/null; then
    fail "pytest is not installed in $PYTHON: the CUDA tests cannot run"
elif [ "${#files[@]}" -eq 0 ]; then
    fail "no test file mentions cuda"
else
    # -k cuda: the tests named for CUDA (they skip themselves without a device; -rs lists any skip)
    timeout -k 10 "$T_TESTS" "$PYTHON" -m pytest -q -rs -p no:cacheprovider -k cuda "${files[@]}" \
        || fail "CUDA tests (exit $?)"
fi

step "benchmark on $DEVICE: python -m optzoo.bench --device $DEVICE $BENCH_ARGS"
rm -f "$BENCH_OUT/latest.json"
# shellcheck disable=SC2086  # BENCH_ARGS is a list of arguments
if timeout -k 10 "$T_BENCH" "$PYTHON" -m optzoo.bench --device "$DEVICE" --mxnet none --out "$BENCH_OUT" $BENCH_ARGS; then
    step "summary ($BENCH_OUT/latest.json)"
    timeout -k 5 30 "$PYTHON" - "$BENCH_OUT/latest.json" <<'EOF' || fail "summary"
import json
import sys
r = json.load(open(sys.argv[1]))
copy = r.get("copy") or {}
d = r.get("device", {})
print(f"device: {d.get('device')} {d.get('name', '')}; copy bandwidth: "
      + (f"{copy['gbps']:.0f} GB/s (2 x {copy['bytes'] / 2**20:.0f} MiB / {copy['ms']:.3f} ms, {copy['timer']})"
         if copy else "not measured"))
bad = 0
for key, w in r["workloads"].items():
    b = w["baseline"]
    print(f"\n{w['describe']}\n  torch fused Adam: " + (f"{b['ms']:.3f} ms, {b['gbps']:.0f} GB/s"
          + (f" ({b['gbps'] / copy['gbps']:.0%} of copy)" if copy else "") if "ms" in b else b.get("error", "?")))
    print(f"  {'optimizer':<14} {'fused':<5} {'ms':>9} {'GB/s':>8} {'x Adam GB/s':>12} {'of copy':>8}")
    for row in (x for x in r["rows"] if x["workload"] == key):
        mode = str(row["fused"])
        if "error" in row or not row.get("finite", False):
            bad += 1
            print(f"  {row['optimizer']:<14} {mode:<5} error: {row.get('error', 'non-finite weights')}")
            continue
        share = f"{row['gbps'] / copy['gbps']:.0%}" if copy else "-"
        print(f"  {row['optimizer']:<14} {mode:<5} {row['ms']:9.3f} {row['gbps']:8.1f} "
              f"{row.get('vs_adam_gbps', float('nan')):12.2f} {share:>8}")
sys.exit(f"{bad} rows failed" if bad else 0)
EOF
else
    fail "benchmark on $DEVICE (exit $?; 124 = timed out after $T_BENCH s)"
fi

echo
if [ "$status" -eq 0 ]; then
    echo "gpu_check: OK in $SECONDS s"
else
    echo "gpu_check: FAILED in $SECONDS s" >&2
fi
exit "$status"
