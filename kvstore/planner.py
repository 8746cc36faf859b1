"""Load or recompute: how many leading tokens of a request are worth loading, and from where.

Loading a block costs its bytes over the bandwidth of the tier that holds it
(the tier's measured read bandwidth once it has served reads, which already
includes decoding its codec; before that a prior from the medium and the
codec's nominal decode speed). Recomputing costs tokens over the engine's
prefill throughput (configured, or measured by the integration through
``record_prefill``). The plan loads the leading blocks that save the most
time and never a prefix expected to take longer to load than to recompute.
With no prefill throughput known yet, every stored token is loaded: that
is what a cache is for until there is evidence against it.

The planner also keeps what loading saved: prefill tokens and the compute
seconds they would have cost, next to the seconds spent loading them.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

# Weight of the newest prefill measurement in the moving throughput estimate.
ALPHA = 0.3


@dataclass(frozen=True)
class TierCost:
    """What the planner knows about one tier: name and expected read bandwidth (bytes/s)."""

    name: str
    bytes_per_second: float

    def seconds(self, nbytes: int) -> float:
        return nbytes / self.bytes_per_second if self.bytes_per_second > 0 else math.inf


def tier_bandwidth(prior: float, measured: float, decode_bytes_per_second: float = math.inf) -> float:
    """Expected read bandwidth (bytes/s): the measured one, else the medium's ``prior`` (its tier spec's,
    bytes/s) and the codec's decode rate combined."""
    if measured > 0:
        return float(measured)
    return 1.0 / (1.0 / prior + 1.0 / decode_bytes_per_second)


@dataclass(frozen=True)
class LoadPlan:
    """The decision for one request.

    ``found``: leading tokens stored in some tier; ``load_tokens``: leading
    tokens to load (a prefix of ``found`` on a block boundary, or all of it);
    ``sources``: of those, tokens per tier name; ``load_seconds`` and
    ``recompute_seconds``: estimates for the ``load_tokens`` (recompute is
    0.0 when the prefill throughput is unknown).
    """

    num_tokens: int
    found: int
    load_tokens: int
    sources: dict[str, int] = field(default_factory=dict)
    load_seconds: float = 0.0
    recompute_seconds: float = 0.0

    @property
    def compute_tokens(self) -> int:
        """Tokens the engine must prefill itself."""
        return self.num_tokens - self.load_tokens

    @property
    def skipped_tokens(self) -> int:
        """Stored tokens the plan recomputes because loading them is slower."""
        return self.found - self.load_tokens


class Planner:
    """Plans loads and keeps the savings; thread-safe.

    ``prefill_tokens_per_second``: the engine's prefill throughput, or 0 to
    learn it from ``record_prefill``.
    """

    def __init__(self, prefill_tokens_per_second: float = 0.0):
        if isinstance(prefill_tokens_per_second, bool) or not isinstance(prefill_tokens_per_second, (int, float)) \
                or not prefill_tokens_per_second >= 0:
            raise ValueError(f"prefill_tokens_per_second: expected a number >= 0, got {prefill_tokens_per_second!r}")
        self._configured = float(prefill_tokens_per_second)
        self._measured = 0.0
        self._lock = threading.Lock()
        self._saved_tokens = 0
        self._saved_seconds = 0.0
        self._load_seconds = 0.0
        self._plans = 0
        self._skipped_tokens = 0

    def record_prefill(self, num_tokens: int, seconds: float) -> None:
        """The engine prefilled ``num_tokens`` tokens in ``seconds``: moves the throughput estimate."""
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 0:
            raise ValueError(f"num_tokens: expected an int >= 0, got {num_tokens!r}")
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 <= seconds < math.inf:
            raise ValueError(f"seconds: expected a finite number >= 0, got {seconds!r}")
        if num_tokens == 0 or seconds == 0:
            return
        try:
            rate = num_tokens / seconds
        except OverflowError:
            rate = math.inf
        if rate == math.inf:  # one such sample kept the average infinite for ever: nothing loaded again
            raise ValueError(f"num_tokens / seconds: expected a finite prefill rate, got {num_tokens} tokens in "
                             f"{seconds!r} s")
        with self._lock:
            self._measured = rate if self._measured == 0 else (1 - ALPHA) * self._measured + ALPHA * rate

    @property
    def prefill_tokens_per_second(self) -> float:
        """The configured throughput, else the measured one; 0.0 while unknown."""
        return self._configured or self._measured

    def plan(self, num_tokens: int, blocks: Sequence[tuple[int, int, TierCost]]) -> LoadPlan:
        """Plan a request of ``num_tokens`` tokens whose leading stored blocks are ``blocks``.

        ``blocks``: ``(end token, bytes, tier)`` of each leading stored block
        in order. The plan loads the prefix that saves the most time, if any saves time at all.
        """
        throughput = self.prefill_tokens_per_second
        found = blocks[-1][0] if blocks else 0
        best_end, best_gain, elapsed, best_elapsed = 0, 0.0, 0.0, 0.0
        for end, nbytes, tier in blocks:
            elapsed += tier.seconds(nbytes)
            gain = 0.0 if throughput == 0 else end / throughput - elapsed
            if math.isfinite(elapsed) if throughput == 0 else gain > best_gain:
                best_end, best_gain, best_elapsed = end, gain, elapsed
        sources: dict[str, int] = {}
        start = 0
        for end, _, tier in blocks:
            if end > best_end:
                break
            sources[tier.name] = sources.get(tier.name, 0) + end - start
            start = end
        plan = LoadPlan(num_tokens, found, best_end, sources, best_elapsed,
                        best_end / throughput if throughput else 0.0)
        with self._lock:
            self._plans += 1
            self._skipped_tokens += plan.skipped_tokens
        return plan

    def record_load(self, num_tokens: int, seconds: float) -> None:
        """``num_tokens`` tokens were loaded instead of prefilled, in ``seconds``."""
        throughput = self.prefill_tokens_per_second
        with self._lock:
            self._saved_tokens += num_tokens
            self._load_seconds += seconds
            if throughput:
                self._saved_seconds += num_tokens / throughput

    def snapshot(self) -> dict[str, float | int]:
        """Prefill tokens saved, estimated compute seconds saved, seconds spent loading, plans made."""
        with self._lock:
            return {"prefill_tokens_saved": self._saved_tokens,
                    "compute_seconds_saved": round(self._saved_seconds, 6),
                    "load_seconds": round(self._load_seconds, 6),
                    "prefill_tokens_per_second": round(self.prefill_tokens_per_second, 1),
                    "plans": self._plans, "plan_skipped_tokens": self._skipped_tokens}
