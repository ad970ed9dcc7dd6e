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


def test_a_frozen_store_host_is_named_within_the_timeout():
    """Rank 0 hosts the rendezvous store (env://, no torchrun) and freezes (SIGSTOP: a hung machine): the
    collective times out, and naming the culprit must not wait on the frozen store (torch's TCPStore
    client would block for ever)."""
    results = dist_common.run(W.fault, 2, args=(0, "freeze", TIMEOUT), timeout=60, wait_for=[1],
                              store_on_rank0=True)
    assert results[0] is None  # frozen, then killed by the launcher
    failed = results[1]
    assert isinstance(failed, dist_common.Failed), f"rank 1: {failed!r}"
    assert failed.type == "DistributedError" and failed.ranks == (0,), failed
    assert "rendezvous store did not answer" in failed.message and "rank 0" in failed.message, failed
    assert "died or hangs" in failed.message and f"timeout {TIMEOUT:g} s" in failed.message, failed
    # a correctness bound, not a benchmark: the unbounded fault path took 50 s to for ever
    bound = TIMEOUT + min(_group.GRACE, TIMEOUT) + 10
    assert failed.elapsed <= bound, f"rank 1 took {failed.elapsed:.1f} s (bound {bound} s)"
