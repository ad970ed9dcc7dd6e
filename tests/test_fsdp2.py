"""FSDP2 (``fully_shard``, DTensor parameters): every optimizer steps sharded parameters in two real gloo
processes, with the numbers of one process on the full tensors; LARS and LAMB take each parameter's norm
over all its shards, and SGLD's shards draw the noise of the whole parameter (counters from each shard's
place in it)."""
import pytest
import torch

import dist_common
import fsdp2_worker as W
from specs import SPECS

#: the norms of a sharded parameter are fp64 sums over the shards, one process's are MXNet's fp32 sums
NORM_RTOL = 1e-5


@pytest.fixture(scope="module")
def launched():
    results = dist_common.run(W.sharded, 2, timeout=240)
    failed = [r for r in results if not isinstance(r, dict)]
    assert not failed, f"workers failed: {failed} {[getattr(f, 'traceback', '') for f in failed]}"
    return results


@pytest.mark.parametrize("spec", [pytest.param(s, id=s.name) for s in SPECS])
def test_sharded_parameters_equal_one_process(launched, spec):
    want = W.single(spec)
    for rank, result in enumerate(launched):
        got = result[spec.name]
        assert got["state_types"] in ([], ["DTensor", "int"], ["int"]), got["state_types"]
        for a, b in zip(want, got["weights"]):
            if "bucket_norms" in spec.flags:
                torch.testing.assert_close(b, a, rtol=NORM_RTOL, atol=NORM_RTOL * float(a.abs().max()))
            else:
                assert torch.equal(a, b), f"rank {rank}: {(a - b).abs().max()}"
