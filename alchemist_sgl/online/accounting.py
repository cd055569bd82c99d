"""Where every training sample ends, and what the rounds made of its prompt tokens.

Owns ``SampleFates`` (fed, trained, deferred, dropped, expired: Note [Sample fates]) and
``RoundTally`` (per trained sample: lane, lag, prompt tokens replayed or not; applied when a round
closes). Pure: the standard library only.

Note [Sample fates]: a sample is *fed* once, when a feedback row or an admin sample enters the
queue for the first time. It then ends exactly once as *trained* (its round took the optimizer
step, or the gate refused the version it built), *dropped* (an admin sample older than
``train.stale_max_age_s`` while stale, or a round whose gradients were not finite), *deferred* (a
feedback row older than ``train.stale_max_age_s`` while stale: back in the feedback table, trained
later when the queue is empty; it leaves ``deferred`` when it is admitted again), or *expired* (a
feedback row whose completion left the log before it could be trained). At any moment
``fed == trained + deferred + dropped + expired + pending + in the open round``.

Note [Prompt token fates]: per trained sample, its prompt tokens are
  * ``lag0``: replayed from a recording of the round's own version (exact);
  * ``approximate``: replayed from a recording within ``train.max_version_lag`` (lag >= 1);
  * ``stale_recomputed``: recomputed because the sample was beyond the lag bound (its pin was
    released at publish; its recording is never read);
  * ``hole``: a lag-0 or approximate sample's tokens its recording does not cover (decoded tokens
    of an earlier turn are never prefilled; a page dropped for space; a radix hit on a page the
    store did not keep);
  * ``evicted``: a lag-0 or approximate sample that found no recording at all at intake (its pages
    were evicted first, or it was never recorded).
With replay switched off (the recompute arm) every token is counted where it would have come
from, as if replayed; ``replayed_tokens`` of the trainer says what was actually replayed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

TOKEN_FATES = ("lag0", "approximate", "stale_recomputed", "hole", "evicted")


@dataclass
class SampleFates:
    fed: int = 0
    trained: int = 0
    deferred: int = 0
    dropped: int = 0
    expired: int = 0

    def as_status(self) -> dict[str, int]:
        return {"trained": self.trained, "deferred": self.deferred, "dropped": self.dropped,
                "expired": self.expired}


@dataclass(frozen=True)
class TakenSample:
    """One sample whose units ran in a round."""
    lane: str                 # fresh | approximate | stale (intake.py, Note [Lanes])
    lag: int | None           # versions between its prefill and the round's (None: a branch)
    prompt_tokens: int
    covered_tokens: int       # prompt tokens its recording covers (0 without one)
    has_recording: bool
    enqueued_at: float


@dataclass
class RoundTally:
    """Cumulative per-sample accounting of closed rounds (checkpointed with the loop)."""
    samples_trained_by_lag: dict[str, int] = field(default_factory=dict)
    prompt_tokens_by_fate: dict[str, int] = field(
        default_factory=lambda: {k: 0 for k in TOKEN_FATES})
    intake_to_publish_s: list[float] = field(default_factory=list)  # the last 512

    def add_round(self, taken: list[TakenSample]) -> None:
        """Counts a closed round's samples, when its step has run (before its publish)."""
        fates = self.prompt_tokens_by_fate
        for s in taken:
            key = "branch" if s.lag is None else str(s.lag)
            self.samples_trained_by_lag[key] = self.samples_trained_by_lag.get(key, 0) + 1
            if s.lane == "stale":
                fates["stale_recomputed"] += s.prompt_tokens
                continue
            fates["lag0" if s.lane == "fresh" else "approximate"] += s.covered_tokens
            fates["hole" if s.has_recording else "evicted"] += s.prompt_tokens - s.covered_tokens

    def add_publish_delays(self, taken: list[TakenSample], published_at: float) -> None:
        """Intake-to-publish delays of a round that published at ``published_at`` (loop clock)."""
        self.intake_to_publish_s = (self.intake_to_publish_s + [
            max(0.0, published_at - s.enqueued_at) for s in taken])[-512:]


def percentiles(values: list[float]) -> dict[str, float | None]:
    """{p50, p90} of ``values`` (nearest rank), None when empty."""
    if not values:
        return {"p50": None, "p90": None}
    ordered = sorted(values)

    def rank(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, int(round(q * len(ordered) + 0.5)) - 1))]

    return {"p50": rank(0.5), "p90": rank(0.9)}
