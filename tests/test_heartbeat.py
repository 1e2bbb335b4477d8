"""The heartbeat watchdog's judgement (which peer is lost), on a simulated clock. The real thing,
a frozen rank ending an MPI job, is test_errors.py's frozen-rank test."""

from hpc_mto.heartbeat import DONE, PeerWatch

TIMEOUT, INTERVAL = 10.0, 2.5


def run_checks(watch, start, end, values_at):
    """Check every INTERVAL from start to end; the first lost peer and when, or None."""
    t = start
    while t <= end:
        lost = watch.check(t, values_at(t))
        if lost is not None:
            return lost, t
        t += INTERVAL
    return None


def test_a_silent_peer_is_lost_after_the_timeout_and_a_beating_or_finished_one_never():
    watch = PeerWatch(k=4, task=0, timeout=TIMEOUT, interval=INTERVAL, now=0.0)
    # peer 1 beats, peer 2 stops at 5 s, peer 3 has left the run normally
    values = lambda t: {1: str(int(t)), 2: str(min(int(t), 5)), 3: DONE}
    lost, when = run_checks(watch, INTERVAL, 100.0, values)
    assert lost == 2 and 5 + TIMEOUT < when <= 5 + TIMEOUT + INTERVAL


def test_a_peer_that_never_wrote_is_lost_after_the_timeout():
    watch = PeerWatch(k=2, task=1, timeout=TIMEOUT, interval=INTERVAL, now=0.0)
    lost, when = run_checks(watch, INTERVAL, 100.0, lambda t: {0: None})
    assert lost == 0 and TIMEOUT < when <= TIMEOUT + INTERVAL


def test_a_suspended_job_does_not_count_the_suspension_as_silence():
    """scontrol suspend stops every task: after the resume the peers' beats are old, but so is ours."""
    watch = PeerWatch(k=2, task=0, timeout=TIMEOUT, interval=INTERVAL, now=0.0)
    assert run_checks(watch, INTERVAL, 20.0, lambda t: {1: str(t)}) is None
    # suspended from 20 s to 500 s: peer 1's value is still the one from 20 s when we wake up
    assert watch.check(500.0, {1: "20.0"}) is None
    assert watch.check(500.0 + INTERVAL, {1: str(500.0 + INTERVAL)}) is None
    # and a peer that stays silent after the resume is still found, one timeout later
    lost, when = run_checks(watch, 500.0 + 2 * INTERVAL, 600.0, lambda t: {1: "frozen"})
    assert lost == 1 and when <= 500.0 + 2 * INTERVAL + TIMEOUT + INTERVAL
