"""A worker that dies or hangs makes the others raise DistributedError naming it, within the timeout."""
import pytest

from optzoo.kvstore import _group
import dist_common
import dist_sync_worker as W

TIMEOUT = 2.0


@pytest.mark.parametrize("how, victim, world", [("kill", 0, 3), ("hang", 1, 2)])
def test_survivors_raise_naming_the_failed_rank(how, victim, world):
    survivors = [r for r in range(world) if r != victim]
    results = dist_common.run(W.fault, world, args=(victim, how, TIMEOUT), timeout=60, wait_for=survivors)
    assert results[victim] is None  # killed (by itself, or by the launcher once the others were done)
    bound = TIMEOUT + min(_group.GRACE, TIMEOUT) + 3
    for rank in survivors:
        failed = results[rank]
        assert isinstance(failed, dist_common.Failed), f"rank {rank}: {failed!r}"
        assert failed.type == "DistributedError" and "RuntimeError" in failed.mro, failed
        assert failed.ranks == (victim,), failed
        assert f"rank {victim} did not report" in failed.message and "died or hangs" in failed.message, failed
        assert failed.elapsed <= bound, f"rank {rank} took {failed.elapsed:.1f} s (bound {bound} s)"
