"""The ``spike`` experiment's pure parts: the load profile, the polled status trace and what is read
from it (helper module: ``discover()`` skips names starting with ``_``).

Owns ``SpikeProfile`` (a steady Poisson base rate with one burst in the middle: pre, burst, post),
``trace_row`` (the few ``/alchemist/status`` numbers one poll keeps), ``resumed_after`` (from a
trace, when the arbiter yielded around the burst and how long after the burst's end training ran
again), ``state_changes``, ``clock_origin`` (the load session's start on the wall clock, from the
times completions were handed over), ``publish_windows`` (each publish's stall and whole publish
as time spans of the session, from the versions' ``created_at`` and ``publish.recent``),
``split_by_windows`` and ``ttft_ms``. No I/O, no threads; times are seconds.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from eval.loadgen.arrivals import ArrivalSpec, Burst
from eval.loadgen.stats import percentile

PHASES = ("pre", "burst", "post")


@dataclass(frozen=True)
class SpikeProfile:
    """``pre_s`` at ``base_rps``, then ``burst_s`` at ``burst_rps``, then ``post_s`` at ``base_rps``."""

    base_rps: float
    pre_s: float
    burst_s: float
    burst_rps: float
    post_s: float

    def __post_init__(self) -> None:
        if min(self.base_rps, self.pre_s, self.burst_s, self.post_s) < 0 or self.burst_rps <= self.base_rps:
            raise ValueError(f"a spike needs non-negative spans and burst_rps > base_rps: {self}")

    @property
    def burst_start_s(self) -> float:
        return self.pre_s

    @property
    def burst_end_s(self) -> float:
        return self.pre_s + self.burst_s

    @property
    def duration_s(self) -> float:
        return self.pre_s + self.burst_s + self.post_s

    def arrivals(self) -> ArrivalSpec:
        return ArrivalSpec(self.base_rps, (Burst(self.pre_s, self.burst_s, self.burst_rps),))

    def expected_requests(self) -> float:
        return self.base_rps * (self.pre_s + self.post_s) + self.burst_rps * self.burst_s

    def phase(self, t_s: float) -> str:
        """Which part of the profile a send time falls in."""
        if t_s < self.burst_start_s:
            return "pre"
        return "burst" if t_s < self.burst_end_s else "post"


def _num(section: Any, key: str) -> float | None:
    value = section.get(key) if isinstance(section, Mapping) else None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def trace_row(status: Mapping[str, Any], t: float) -> dict[str, Any]:
    """One poll: ``t`` plus the arbiter's state/transitions/reason, train steps/units/pending/paused,
    publishes and the serving weight version (None where the server has no such section)."""
    arbiter = status.get("arbiter") if isinstance(status.get("arbiter"), Mapping) else {}
    train = status.get("train") if isinstance(status.get("train"), Mapping) else {}
    publish = status.get("publish") if isinstance(status.get("publish"), Mapping) else {}
    return {"t": t, "state": arbiter.get("state"), "transitions": _num(arbiter, "transitions"),
            "reason": arbiter.get("reason"), "is_spike": arbiter.get("is_spike"),
            "steps": _num(train, "steps"), "units_run": _num(train, "units_run"),
            "pending": _num(train, "samples_pending"), "paused": train.get("paused"),
            "publishes": _num(publish, "publishes"), "weight_version": status.get("weight_version")}


def shifted(rows: Iterable[Mapping[str, Any]], origin: float) -> list[dict[str, Any]]:
    """The rows with ``t`` made relative to ``origin`` (a wall-clock time)."""
    return [{**r, "t": r["t"] - origin} for r in rows]


def _is_yielded(row: Mapping[str, Any]) -> bool:
    return row.get("state") not in (None, "TRAINING")


def _grew(rows: Sequence[Mapping[str, Any]], i: int, key: str) -> bool:
    if i == 0:
        return False
    a, b = rows[i - 1].get(key), rows[i].get(key)
    return a is not None and b is not None and b > a


def resumed_after(rows: Sequence[Mapping[str, Any]], burst_start_s: float, burst_end_s: float) -> dict[str, Any]:
    """From a trace (``t`` relative to the session start, sorted), around one burst:

    ``yielded``: some poll in [burst start, end] or after the end showed the arbiter not TRAINING;
    the yield taken is the last such poll inside the burst, else the first one after it.
    ``state_resumed_after_s``: first poll after that yield back in TRAINING, minus the burst end;
    ``resumed_after_s``: first such poll at which ``units_run`` had grown since the poll before
    (work units running again), minus the burst end; ``step_after_s``: first poll after the yield
    whose ``steps`` had grown, minus the burst end. Negative: training came back before the
    burst's arrivals ended. None: not seen in the trace (``yielded`` False, or the trace ended)."""
    out: dict[str, Any] = {"yielded": False, "yield_seen_at_s": None, "state_resumed_after_s": None,
                           "resumed_after_s": None, "step_after_s": None}
    inside = [i for i, r in enumerate(rows) if burst_start_s <= r["t"] <= burst_end_s and _is_yielded(r)]
    after = [i for i, r in enumerate(rows) if r["t"] > burst_end_s and _is_yielded(r)]
    if inside:
        y = inside[-1]
    elif after:
        y = after[0]
    else:
        return out
    out.update(yielded=True, yield_seen_at_s=rows[y]["t"] - burst_start_s)
    for i in range(y + 1, len(rows)):
        r = rows[i]
        if r.get("state") == "TRAINING" and out["state_resumed_after_s"] is None:
            out["state_resumed_after_s"] = r["t"] - burst_end_s
        if out["state_resumed_after_s"] is not None:
            if out["resumed_after_s"] is None and r.get("state") == "TRAINING" and _grew(rows, i, "units_run"):
                out["resumed_after_s"] = r["t"] - burst_end_s
        if out["step_after_s"] is None and _grew(rows, i, "steps"):
            out["step_after_s"] = r["t"] - burst_end_s
    return out


def state_changes(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``[{t_s, from, to, reason}]`` where consecutive polls show different arbiter states."""
    return [{"t_s": b["t"], "from": a.get("state"), "to": b.get("state"), "reason": b.get("reason")}
            for a, b in zip(rows, rows[1:]) if a.get("state") != b.get("state")]


def clock_origin(records: Sequence[Mapping[str, Any]], stamps: Mapping[str, float]) -> float | None:
    """The session's start on the wall clock: median over completed requests of (wall time its id
    was handed over) - (``start_s + e2e_s``, its end in session time); None without any."""
    xs = [stamps[r["completion_id"]] - (r["start_s"] + r["e2e_s"]) for r in records
          if r.get("error") is None and r.get("completion_id") in stamps
          and r.get("start_s") is not None and r.get("e2e_s") is not None]
    return statistics.median(xs) if xs else None


def publish_windows(versions: Iterable[Mapping[str, Any]], recent: Mapping[str, Mapping[str, Any]],
                    origin: float, until: float) -> list[dict[str, Any]]:
    """Served versions created in [origin, until] (wall clock) as session-time spans: ``stall`` =
    [created - stall_ms, created] (the copy into the live tensors; the version is minted right
    after it), ``publish`` = [created - publish_ms, created] (build units + copy). ``recent`` maps a
    version to its ``publish.recent`` entry; a version without one gets zero-length spans."""
    out = []
    for v in versions:
        at = v.get("created_at")
        if v.get("state") == "rejected" or not isinstance(at, (int, float)) or not origin <= at <= until:
            continue
        entry = recent.get(str(v.get("name"))) or {}
        stall_s = float(entry.get("stall_ms") or 0.0) / 1000.0
        publish_s = float(entry.get("publish_ms") or 0.0) / 1000.0
        t = at - origin
        out.append({"version": v.get("name"), "at_s": t, "stall_ms": entry.get("stall_ms"),
                    "publish_ms": entry.get("publish_ms"), "stall": (t - stall_s, t), "publish": (t - publish_s, t)})
    return sorted(out, key=lambda w: w["at_s"])


def _waiting(rec: Mapping[str, Any]) -> tuple[float, float] | None:
    if rec.get("error") is not None or rec.get("start_s") is None or rec.get("ttft_s") is None:
        return None
    return rec["start_s"], rec["start_s"] + rec["ttft_s"]


def split_by_windows(records: Iterable[Mapping[str, Any]], spans: Sequence[tuple[float, float]],
                     margin_s: float = 0.0) -> tuple[list[Mapping[str, Any]], list[Mapping[str, Any]]]:
    """(successful requests whose wait for the first token, [start, start + ttft], intersects a span
    widened by ``margin_s`` on each side; the other successful requests)."""
    inside, outside = [], []
    for rec in records:
        wait = _waiting(rec)
        if wait is None:
            continue
        hit = any(wait[0] < b + margin_s and wait[1] > a - margin_s for a, b in spans)
        (inside if hit else outside).append(rec)
    return inside, outside


def ttft_ms(records: Iterable[Mapping[str, Any]], q: float = 95) -> float:
    """The ``q``-th percentile TTFT (ms) of the successful requests; NaN when none."""
    return percentile([r["ttft_s"] * 1000.0 for r in records
                       if r.get("error") is None and r.get("ttft_s") is not None], q)


def ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(a) and not math.isnan(b) else float("nan")
