"""The memory arbiter: once per scheduler iteration, how much training may run and keep resident.

Owns ``MemoryArbiter`` (a pure policy: standard library only, clock injected), its input
``ServingPressure``, its output ``ArbiterDecision`` and ``TtftWindow`` (the recent-TTFT signal).
Must not import torch, sglang or any package module but ``config``. The runtime builds a
``ServingPressure`` from SGLang's views each iteration, calls ``decide`` once, and honours the
decision: ``slice_ms == 0`` means no work unit starts in this iteration; ``train_budget_bytes``
is what training may keep on the device; leaving TRAINING moves a step's saved tensors to host
(train/offload.py, Note [Yield moves memory]).

Note [Arbiter policy]:
  Signals (one ``ServingPressure`` per iteration). A SPIKE is any of: ``waiting_requests >=
  memory.waiting_requests_high``; ``kv_free_fraction < 1 - memory.kv_usage_high`` (free counts the
  radix cache's evictable tokens, so a full cache is not pressure); the arrival-rate EMA
  ``>= memory.arrival_rate_high_per_s``; ``recent_ttft_ms > memory.ttft_target_ms``. CALM is every
  signal below ``memory.recover_fraction`` x its mark (strictly). Between the two is the
  hysteresis band. TTFT counts only while requests wait or run: a finished burst's TTFT is stale
  and must not hold an idle server yielded. The EMA treats arrivals as impulses:
  ``rate <- rate * exp(-dt / tau) + arrivals / tau`` (``tau = memory.arrival_ema_tau_s``), so it
  needs no division by a tiny dt and decays on its own while nothing arrives.

  States and the only transitions:
    TRAINING -> YIELDING  spike entry: in the same decision that first sees a spike, never delayed
                          by dwell or cap (the cap has room for it, below);
    YIELDING -> PAUSED    escalation: pressure (from a spike until the next calm iteration) has
                          lasted ``memory.pause_after_s`` and the state ``memory.min_dwell_s``;
    YIELDING/PAUSED -> TRAINING  recovery: calm continuously for ``min_dwell_s``, in the state for
                          ``min_dwell_s``, and the cap below allows it.
  Outputs: TRAINING gives ``busy_slice_ms`` (requests wait or run; the runtime passes
  ``train.slice_budget_ms``) or ``idle_slice_ms`` (``train.idle_slice_ms``) and the whole
  ``memory.train_budget_bytes``; YIELDING gives slice
  0 and ``memory.yield_budget_fraction`` of the budget; PAUSED gives slice 0 and budget 0.

  Cap. Every transition counts (entries, escalations, recoveries). Only recoveries are ever
  suppressed: a recovery at time t happens only if the transitions in (t - 60 s, t], plus itself,
  plus ``_RESERVED_AFTER_RECOVERY`` = 2 (the spike entry and the pause that may follow before the
  next recovery), are at most ``memory.max_transitions_per_minute`` = C. Proof that every 60 s
  window W holds at most C: if W holds no recovery it holds at most 2 transitions (an entry and a
  pause; only a recovery leaves PAUSED). Otherwise let r be W's last recovery: the transitions of
  W before r lie in r's own look-back window, so there are at most C - 3 of them; then r itself,
  then at most 2 escalations before a recovery, which would be after r and so not in W. Hence
  C >= 3 (validated), and a flapping trace stays yielded rather than oscillating.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Literal

from alchemist_sgl.config import MemoryConfig

ArbiterState = Literal["TRAINING", "YIELDING", "PAUSED"]

WINDOW_S = 60.0
_RESERVED_AFTER_RECOVERY = 2  # a spike entry and an escalation (Note [Arbiter policy], "Cap")


@dataclass(frozen=True)
class ServingPressure:
    """What serving looks like at one iteration (read from SGLang by integration/)."""
    waiting_requests: int
    waiting_tokens: int
    running_requests: int
    kv_free_fraction: float  # (available + evictable radix tokens) / pool size
    arrivals: int  # requests admitted since the previous iteration
    recent_ttft_ms: float | None = None  # TtftWindow.value: recent first tokens; None: none


def kv_free_fraction(available_tokens: int, evictable_tokens: int, pool_tokens: int) -> float:
    """KV free for serving: the radix cache's evictable tokens count as free (a full cache is not
    pressure). ``pool_tokens`` <= 0 reads as all free (no pool, nothing to protect)."""
    if pool_tokens <= 0:
        return 1.0
    return min(1.0, max(0.0, (available_tokens + evictable_tokens) / pool_tokens))


class TtftWindow:
    """Recent time to first token: Note [TTFT window].

    ``add(ttft_ms, now)`` records one request's first token; ``value(now)`` is the median of the
    last ``size`` first tokens seen within ``max_age_s`` of ``now`` (None when there are none).
    ``now`` is any non-decreasing clock in seconds (the runtime's). Scheduler thread only.

    Note [TTFT window]: the median, not the mean or the max, so one slow request (a long prompt, a
    publish stall) neither yields training on its own nor hides behind fast ones; a burst that
    slows most first tokens moves it within ``size // 2 + 1`` requests. The age bound drops a past
    burst's samples while traffic is too light to push them out (the arbiter also ignores TTFT
    while nothing waits or runs, Note [Arbiter policy]).
    """

    def __init__(self, size: int = 8, max_age_s: float = 15.0) -> None:
        if size < 1 or max_age_s <= 0:
            raise ValueError(f"TtftWindow needs size >= 1 and max_age_s > 0 (got {size}, {max_age_s})")
        self.size, self.max_age_s = size, max_age_s
        self._samples: deque[tuple[float, float]] = deque(maxlen=size)  # (seen at, ttft_ms)
        self.count = 0  # first tokens recorded since construction

    def add(self, ttft_ms: float, now: float) -> None:
        self._samples.append((now, max(0.0, float(ttft_ms))))
        self.count += 1

    def value(self, now: float) -> float | None:
        live = sorted(ms for at, ms in self._samples if at > now - self.max_age_s)
        if not live:
            return None
        mid = len(live) // 2
        return live[mid] if len(live) % 2 else (live[mid - 1] + live[mid]) / 2.0


@dataclass(frozen=True)
class ArbiterDecision:
    state: ArbiterState
    train_budget_bytes: int
    slice_ms: float  # 0: no work unit may start in this iteration
    is_spike: bool
    reason: str


class MemoryArbiter:
    """The policy of Note [Arbiter policy]. Contract: ``decide`` is called once per scheduler
    iteration on the scheduler thread, with a non-decreasing ``clock`` (seconds); it has no side
    effects outside this object. ``memory.is_enabled: false`` always answers TRAINING with the
    plain slices (signals and the EMA are still computed for status)."""

    def __init__(self, config: MemoryConfig, *, busy_slice_ms: float, idle_slice_ms: float,
                 clock: Callable[[], float]) -> None:
        self.config = config
        self.busy_slice_ms = busy_slice_ms
        self.idle_slice_ms = idle_slice_ms
        self.clock = clock
        self.state: ArbiterState = "TRAINING"
        self.transitions = 0
        self.last_transition_at: float | None = None
        self.entered_at = clock()
        self.arrival_rate_ema_per_s = 0.0
        self._last_now: float | None = None
        self._pressure_since: float | None = None  # a spike seen, no calm iteration since
        self._calm_since: float | None = None  # calm continuously since
        self._recent: deque[float] = deque()  # transition times within the last WINDOW_S
        self._last: ArbiterDecision | None = None
        self.recent_ttft_ms: float | None = None  # the last decision's TTFT input (status)

    # -- signals ---------------------------------------------------------------------------

    def _update_ema(self, arrivals: int, now: float) -> None:
        tau = self.config.arrival_ema_tau_s
        dt = 0.0 if self._last_now is None else max(0.0, now - self._last_now)
        self.arrival_rate_ema_per_s = (self.arrival_rate_ema_per_s * math.exp(-dt / tau)
                                       + arrivals / tau)
        self._last_now = now

    def _spike_signals(self, p: ServingPressure) -> list[str]:
        """The signals at or beyond their high-water marks, each with its numbers."""
        c, out = self.config, []
        if p.waiting_requests >= c.waiting_requests_high:
            out.append(f"waiting_requests {p.waiting_requests} >= {c.waiting_requests_high}")
        if p.kv_free_fraction < 1.0 - c.kv_usage_high:
            out.append(f"kv usage {1.0 - p.kv_free_fraction:.3f} > {c.kv_usage_high}")
        rate_high = c.arrival_rate_high_per_s
        if rate_high is not None and self.arrival_rate_ema_per_s >= rate_high:
            out.append(f"arrival rate {self.arrival_rate_ema_per_s:.2f}/s >= {rate_high}")
        ttft = self._live_ttft_ms(p)
        if c.ttft_target_ms is not None and ttft is not None and ttft > c.ttft_target_ms:
            out.append(f"ttft {ttft:.0f} ms > {c.ttft_target_ms}")
        return out

    def _uncalm_signals(self, p: ServingPressure) -> list[str]:
        """The signals not strictly below ``recover_fraction`` x their marks (empty: calm)."""
        c, f, out = self.config, self.config.recover_fraction, []
        if p.waiting_requests >= f * c.waiting_requests_high:
            out.append("waiting_requests")
        if 1.0 - p.kv_free_fraction >= f * c.kv_usage_high:
            out.append("kv usage")
        rate_high = c.arrival_rate_high_per_s
        if rate_high is not None and self.arrival_rate_ema_per_s >= f * rate_high:
            out.append("arrival rate")
        ttft = self._live_ttft_ms(p)
        if c.ttft_target_ms is not None and ttft is not None and ttft >= f * c.ttft_target_ms:
            out.append("ttft")
        return out

    @staticmethod
    def _live_ttft_ms(p: ServingPressure) -> float | None:
        """TTFT counts only while requests wait or run (Note [Arbiter policy]: stale when idle)."""
        return p.recent_ttft_ms if p.waiting_requests > 0 or p.running_requests > 0 else None

    # -- policy ----------------------------------------------------------------------------

    def _move(self, to: ArbiterState, now: float) -> None:
        self.state = to
        self.transitions += 1
        self.last_transition_at = now
        self.entered_at = now
        self._recent.append(now)

    def decide(self, pressure: ServingPressure) -> ArbiterDecision:
        """One iteration's decision (Note [Arbiter policy]). Call exactly once per iteration."""
        c = self.config
        now = self.clock()
        self.recent_ttft_ms = pressure.recent_ttft_ms
        self._update_ema(pressure.arrivals, now)
        while self._recent and self._recent[0] <= now - WINDOW_S:
            self._recent.popleft()
        spikes = self._spike_signals(pressure)
        is_spike = bool(spikes)
        not_calm = self._uncalm_signals(pressure)
        if not_calm:
            self._calm_since = None
        elif self._calm_since is None:
            self._calm_since = now
        if is_spike and self._pressure_since is None:
            self._pressure_since = now
        elif not not_calm:
            self._pressure_since = None

        if not c.is_enabled:
            reason = "arbiter disabled"
        elif self.state == "TRAINING":
            if is_spike:
                self._move("YIELDING", now)
                reason = "spike: " + "; ".join(spikes)
            else:
                reason = "training"
        else:
            reason = self._while_yielded(now, spikes, not_calm)
        self._last = self._output(pressure, is_spike, reason)
        return self._last

    def _while_yielded(self, now: float, spikes: list[str], not_calm: list[str]) -> str:
        c = self.config
        dwell_s = now - self.entered_at
        if not not_calm:
            calm_s = now - self._calm_since if self._calm_since is not None else 0.0
            if calm_s < c.min_dwell_s or dwell_s < c.min_dwell_s:
                return f"calm for {calm_s:.2f}s, recovery needs {c.min_dwell_s}s"
            needed = len(self._recent) + 1 + _RESERVED_AFTER_RECOVERY
            if needed > c.max_transitions_per_minute:
                return (f"recovery held by the cap: {len(self._recent)} transitions in the last "
                        f"{WINDOW_S:.0f}s, cap {c.max_transitions_per_minute} with "
                        f"{_RESERVED_AFTER_RECOVERY} reserved")
            self._move("TRAINING", now)
            return f"recovered: calm for {calm_s:.2f}s"
        pressure_s = now - self._pressure_since if self._pressure_since is not None else 0.0
        if (self.state == "YIELDING" and self._pressure_since is not None
                and pressure_s >= c.pause_after_s and dwell_s >= c.min_dwell_s):
            self._move("PAUSED", now)
            return f"pressure for {pressure_s:.2f}s >= {c.pause_after_s}s: paused"
        what = "; ".join(spikes) if spikes else "in the hysteresis band: " + ", ".join(not_calm)
        return f"{self.state.lower()}: {what}"

    def _output(self, p: ServingPressure, is_spike: bool, reason: str) -> ArbiterDecision:
        c = self.config
        if not c.is_enabled or self.state == "TRAINING":
            is_busy = p.waiting_requests > 0 or p.running_requests > 0
            slice_ms = self.busy_slice_ms if is_busy else self.idle_slice_ms
            return ArbiterDecision("TRAINING", c.train_budget_bytes, slice_ms, is_spike, reason)
        if self.state == "YIELDING":
            budget = int(c.train_budget_bytes * c.yield_budget_fraction)
            return ArbiterDecision("YIELDING", budget, 0.0, is_spike, reason)
        return ArbiterDecision("PAUSED", 0, 0.0, is_spike, reason)

    # -- status ----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """``/alchemist/status.arbiter``: the docs/api.md keys (``state``, ``transitions``,
        ``last_transition_at``, ``train_budget_bytes``) plus ``is_enabled``,
        ``arrival_rate_ema_per_s``, ``dwell_s`` (seconds in the current state),
        ``transitions_last_minute``, ``is_spike``, ``reason`` and ``recent_ttft_ms`` (the TTFT
        window's value the last decision saw; None: no recent first token)."""
        now = self.clock()
        last = self._last
        budget = last.train_budget_bytes if last is not None else self.config.train_budget_bytes
        return {
            "state": self.state,
            "transitions": self.transitions,
            "last_transition_at": self.last_transition_at,
            "train_budget_bytes": budget,
            "is_enabled": self.config.is_enabled,
            "arrival_rate_ema_per_s": self.arrival_rate_ema_per_s,
            "dwell_s": max(0.0, now - self.entered_at),
            "transitions_last_minute": sum(1 for t in self._recent if t > now - WINDOW_S),
            "is_spike": last.is_spike if last is not None else False,
            "reason": last.reason if last is not None else "no decision yet",
            "recent_ttft_ms": self.recent_ttft_ms,
        }
