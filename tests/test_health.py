"""TierHealth: bandwidth estimate, slow-read and error breaker, back-off and probing, on a fake clock."""

from __future__ import annotations

import pytest

from kvstore.health import DEGRADED, HEALTHY, MIN_SLOW_SECONDS, PROBING, WARMUP_READS, TierHealth

MB = 1 << 20
FAST = 1 / 1024  # 1 MiB in 1/1024 s: 2**30 bytes/s, exactly representable


class FakeClock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock():
    return FakeClock()


def warmed(clock, **kwargs) -> TierHealth:
    """A tier that has done its warm-up reads, each 1 MiB at 2**30 bytes/s."""
    health = TierHealth(clock=clock, **kwargs)
    for _ in range(WARMUP_READS):
        health.record_read(MB, FAST)
    assert health.state == HEALTHY
    return health


def test_constants_are_as_documented():
    assert (HEALTHY, DEGRADED, PROBING) == ("healthy", "degraded", "probing")
    assert WARMUP_READS == 4
    assert MIN_SLOW_SECONDS == 0.005


def test_new_tier_is_healthy(clock):
    health = TierHealth(clock=clock)
    assert health.available()
    assert health.state == "healthy"
    assert health.snapshot() == {"state": "healthy", "read_bandwidth": 0, "error_rate": 0.0,
                                 "errors": 0, "degradations": 0}


def test_warm_up_reads_are_never_judged_slow(clock):
    health = TierHealth(clock=clock)
    for _ in range(WARMUP_READS - 1):
        health.record_read(MB, FAST)
    health.record_read(MB, 2.0)  # the last warm-up read: 2048x slower and long, still not judged
    assert health.state == HEALTHY and health.available()
    assert health.snapshot()["degradations"] == 0
    health.record_read(MB, 2.0)  # the first judged read: far below the (dragged) estimate
    assert health.state == DEGRADED
    assert not health.available()


def test_slow_read_degrades(clock):
    health = warmed(clock)
    health.record_read(MB, 20 * FAST)  # 20x slower, 19.5 ms
    assert 20 * FAST >= MIN_SLOW_SECONDS
    assert health.state == DEGRADED
    assert not health.available()
    snap = health.snapshot()
    assert (snap["state"], snap["degradations"], snap["errors"]) == ("degraded", 1, 0)


def test_moderately_slower_read_does_not_degrade(clock):
    health = warmed(clock)
    health.record_read(2 * MB, 10 * FAST)  # 5x slower than the estimate (below the factor of 10), 9.8 ms
    assert 10 * FAST >= MIN_SLOW_SECONDS
    assert health.state == HEALTHY and health.available()
    assert health.snapshot()["degradations"] == 0


def test_slow_factor_is_configurable(clock):
    health = warmed(clock, slow_factor=3.0)
    health.record_read(2 * MB, 10 * FAST)  # 5x slower: slow for a factor of 3
    assert health.state == DEGRADED


def test_short_slow_read_does_not_degrade(clock):
    health = warmed(clock)
    # 1 KiB in 4 ms: 250 KB/s, thousands of times slower, but shorter than MIN_SLOW_SECONDS.
    seconds = MIN_SLOW_SECONDS * 0.8
    health.record_read(1024, seconds)
    assert health.state == HEALTHY and health.available()
    # The very same bandwidth over a long enough read does degrade.
    health.record_read(int(1024 * 2.5), seconds * 2.5)
    assert health.state == DEGRADED


def test_error_degrades_immediately(clock):
    health = TierHealth(clock=clock)  # no warm-up needed for errors
    health.record_error()
    assert health.state == DEGRADED
    assert not health.available()
    snap = health.snapshot()
    assert (snap["errors"], snap["degradations"], snap["error_rate"]) == (1, 1, 0.2)


def test_back_off_then_probe_then_healthy(clock):
    health = TierHealth(degraded_seconds=30.0, clock=clock)
    health.record_error()
    clock.advance(29.999)
    assert not health.available()
    assert health.state == DEGRADED
    clock.advance(0.001)  # exactly 30 s after the error
    assert health.available()
    assert health.state == PROBING
    assert health.available()  # probing stays available
    health.record_read(MB, FAST)  # a clean read while probing
    assert health.state == HEALTHY
    assert health.snapshot()["degradations"] == 1


def test_state_property_alone_notices_the_back_off_ran_out(clock):
    health = TierHealth(degraded_seconds=5.0, clock=clock)
    health.record_error()
    clock.advance(5.0)
    assert health.state == PROBING
    assert health.snapshot()["state"] == "probing"


def test_ok_operation_while_probing_heals(clock):
    health = TierHealth(degraded_seconds=1.0, clock=clock)
    health.record_error()
    clock.advance(1.0)
    assert health.available() and health.state == PROBING
    health.record_ok()
    assert health.state == HEALTHY


def test_ok_while_degraded_does_not_heal(clock):
    health = TierHealth(degraded_seconds=10.0, clock=clock)
    health.record_error()
    health.record_ok()  # an operation started before the error finished fine
    health.record_read(MB, FAST)
    assert health.state == DEGRADED and not health.available()


def test_error_while_probing_degrades_with_fresh_back_off(clock):
    health = TierHealth(degraded_seconds=30.0, clock=clock)
    health.record_error()
    clock.advance(30.0)
    assert health.state == PROBING
    clock.advance(100.0)  # probing for a while, nothing happened
    health.record_error()
    assert health.state == DEGRADED
    clock.advance(29.9)
    assert not health.available()  # back-off counts from the second error, not the first
    clock.advance(0.1)
    assert health.available() and health.state == PROBING
    snap = health.snapshot()
    assert (snap["errors"], snap["degradations"]) == (2, 2)


def test_slow_read_while_probing_degrades_again(clock):
    health = warmed(clock, degraded_seconds=10.0)
    health.record_error()
    clock.advance(10.0)
    assert health.available() and health.state == PROBING
    health.record_read(MB, 50 * FAST)
    assert health.state == DEGRADED
    clock.advance(9.0)
    assert not health.available()
    assert health.snapshot()["degradations"] == 2


def test_repeated_errors_while_degraded_count_one_degradation(clock):
    health = TierHealth(degraded_seconds=10.0, clock=clock)
    health.record_error()
    clock.advance(6.0)
    health.record_error()  # still degraded: the back-off restarts, one degradation
    clock.advance(6.0)
    assert not health.available()
    clock.advance(4.0)
    assert health.available()
    snap = health.snapshot()
    assert (snap["errors"], snap["degradations"]) == (2, 1)


def test_snapshot_values(clock):
    health = TierHealth(clock=clock)
    health.record_read(MB, FAST)
    assert health.snapshot()["read_bandwidth"] == 2**30  # the first read is the estimate
    health.record_read(MB, 2 * FAST)  # 2**29 bytes/s, moving average with weight 0.2
    assert health.snapshot()["read_bandwidth"] == round(0.9 * 2**30)
    health.record_error()
    snap = health.snapshot()
    assert snap == {"state": "degraded", "read_bandwidth": round(0.9 * 2**30), "error_rate": 0.2,
                    "errors": 1, "degradations": 1}
    health.record_ok()
    assert health.snapshot()["error_rate"] == 0.16  # decays by 0.8 per clean operation
    health.record_read(MB, FAST)
    assert health.snapshot()["error_rate"] == 0.128
    health.record_error()
    assert health.snapshot()["error_rate"] == round(0.8 * 0.128 + 0.2, 4)
    assert health.snapshot()["errors"] == 2
    assert isinstance(health.snapshot()["read_bandwidth"], int)


def test_permanently_slower_tier_eventually_stays_healthy(clock):
    health = warmed(clock, degraded_seconds=30.0)
    slow_seconds = 100 * FAST  # the tier is now 100x slower for good (~98 ms per MiB)
    probes = 0
    while probes < 100:
        if health.available():
            probes += 1
            health.record_read(MB, slow_seconds)
            if health.state == HEALTHY:
                break
        clock.advance(30.0)
    assert health.state == HEALTHY, health.snapshot()
    degradations = health.snapshot()["degradations"]
    assert 1 <= degradations < 30  # it tripped, then the estimate caught up
    assert probes == degradations + 1
    for _ in range(50):  # and from now on the same speed is normal
        health.record_read(MB, slow_seconds)
        assert health.available() and health.state == HEALTHY
    assert health.snapshot()["degradations"] == degradations
    assert health.snapshot()["read_bandwidth"] == pytest.approx(2**30 / 100, rel=0.01)


def test_default_clock_is_monotonic_and_back_off_not_instant():
    health = TierHealth(degraded_seconds=3600.0)
    health.record_error()
    assert not health.available()
