"""The ``online`` experiment's pure parts: status rows, round boundaries, training windows, per-arm
numbers (helper module: ``discover()`` skips names starting with ``_``).

Owns ``status_row`` (what one ``/alchemist/status`` poll keeps), ``round_openings`` (each round the
polls saw, dated on this process's clock), ``training_window`` (the counters' change between the
first and the last round opened in a block with the arm's replay setting), ``arm_summary`` (an
arm's rates, latencies and token accounting over its blocks), ``live_ratios`` (replay /
recompute trained tokens per second, one per round of blocks), ``publish_intervals``,
``store_retention_s`` and the small count arithmetic they share. No I/O, no threads; times are
seconds.

Why windows run from round opening to round opening: the trainer's counters (``tokens_trained``,
``busy_ms``, ``samples_trained_by_lag``, ``prompt_tokens_by_fate``, ...) move only when a round
closes, and a poll that shows a new round comes after the previous round's close, publish and
accounting are done. A round's opening is dated ``t - round.opened_s_ago`` with ``t`` the time the
poll's answer arrived, never before the true opening, so a round opened before the block's resume
cannot be taken for one of the block's. Assumes a round outlasts the poll interval (rounds take at
least one sample's work units and close at ``train.round_s``).
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Iterable, Mapping, Sequence

from eval.loadgen.stats import summarize_requests
from eval.loadgen.training import lag_delta, radix_hit_rate

COUNTERS = ("tokens_trained", "samples_trained", "busy_ms", "replayed_tokens", "recomputed_tokens",
            "graph_samples")
LAG_KEYS = ("samples_trained_by_lag", "reuse_by_lag")
TOKEN_FATES = ("lag0", "approximate", "stale_recomputed", "hole", "evicted")
SAMPLE_FATES = ("trained", "deferred", "dropped", "expired")
BREAKDOWN_KEY = "breakdown_ms"  # cumulative ms per part in ``train``, when a server reports it
BREAKDOWN_PARTS = ("gather", "projections", "attention", "pointwise", "lora", "autograd_other")


def status_row(status: Mapping[str, Any], t: float) -> dict[str, Any]:
    """The numbers one poll keeps; ``t``: when its answer arrived (this process's clock)."""
    train = status.get("train") or {}
    rnd = train.get("round") if isinstance(train.get("round"), dict) else None
    row: dict[str, Any] = {
        "t": t, "version": status.get("weight_version"), "pending": train.get("samples_pending"),
        "key": (train.get("steps"), train.get("nonfinite_skipped")),  # moves once per round closed
        "round_replay": None if rnd is None else rnd.get("replay"),
        "opened_s_ago": None if rnd is None else rnd.get("opened_s_ago"),
        "in_round": train.get("samples_in_round"),
    }
    row.update({k: float(train.get(k) or 0.0) for k in COUNTERS})
    row.update({k: dict(train.get(k) or {}) for k in LAG_KEYS})
    row["prompt_tokens_by_fate"] = dict(train.get("prompt_tokens_by_fate") or {})
    parts = train.get(BREAKDOWN_KEY)
    row["breakdown_ms"] = dict(parts) if isinstance(parts, dict) else None
    return row


SAME_ROUND_S = 1.0  # two rows whose round opened within this of each other show the same round


def round_openings(rows: Sequence[Mapping[str, Any]], t_from: float = -math.inf) -> list[dict[str, Any]]:
    """One entry per round seen in ``rows`` (in order) that opened at or after ``t_from``:
    ``t_open`` (the first row showing it, ``t - opened_s_ago``), ``replay`` and ``row``: the row
    from which its counters are read. A round is new when the key moves (a step finished) and its
    opening time differs; a key that moves while the same round is shown (the previous round's
    step finished after this one opened) moves ``row`` to that later row instead, so the previous
    round's training is not counted as this round's."""
    out: list[dict[str, Any]] = []
    last_key: Any = object()
    for row in rows:
        if row.get("opened_s_ago") is None or row["key"] == last_key:
            continue
        last_key = row["key"]
        t_open = float(row["t"]) - float(row["opened_s_ago"])
        if out and abs(t_open - out[-1]["t_open"]) <= SAME_ROUND_S:
            out[-1]["row"] = row
            continue
        out.append({"t_open": t_open, "replay": row.get("round_replay"), "row": row})
    return [o for o in out if o["t_open"] >= t_from]


def fate_delta(before: Mapping[str, Any], after: Mapping[str, Any],
               names: Sequence[str] = TOKEN_FATES) -> dict[str, int]:
    """Counts by fate added between two snapshots (``prompt_tokens_by_fate``, ``samples_by_fate``):
    every one of ``names`` (zeros kept), then any other key ``after`` has."""
    keys = list(names) + [k for k in after if k not in names]
    return {k: int(after.get(k) or 0) - int(before.get(k) or 0) for k in keys}


def _parts_delta(before: Mapping[str, Any] | None, after: Mapping[str, Any] | None) -> dict[str, float] | None:
    if before is None or after is None:
        return None
    return {k: float(after.get(k) or 0.0) - float(before.get(k) or 0.0) for k in after}


def training_window(rows: Sequence[Mapping[str, Any]], replay: bool, t_from: float) -> dict[str, Any] | None:
    """What the trainer did between the first and the last round opened after ``t_from`` with
    ``round.replay == replay`` (None: fewer than two such openings, no whole round to count)."""
    opens = [o for o in round_openings(rows, t_from) if o["replay"] == replay]
    if len(opens) < 2:
        return None
    a, b = opens[0]["row"], opens[-1]["row"]
    t0, t1 = opens[0]["t_open"], opens[-1]["t_open"]
    inside = [r for r in rows if t0 <= r["t"] <= t1 and r.get("pending") is not None]
    out: dict[str, Any] = {"t_start": t0, "t_end": t1, "seconds": t1 - t0, "rounds": len(opens) - 1}
    out.update({k: b[k] - a[k] for k in COUNTERS})
    out.update({k: lag_delta(a[k], b[k]) for k in LAG_KEYS})
    out["prompt_tokens_by_fate"] = fate_delta(a["prompt_tokens_by_fate"], b["prompt_tokens_by_fate"])
    out["breakdown_ms"] = _parts_delta(a.get("breakdown_ms"), b.get("breakdown_ms"))
    out["saturated_share"] = (sum(1 for r in inside if (r["pending"] or 0) > 0) / len(inside)) if inside else None
    return out


def add_counts(parts: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """Key-wise sum of count dicts (string keys, first-seen order)."""
    out: dict[str, float] = {}
    for d in parts:
        for k, v in d.items():
            out[str(k)] = out.get(str(k), 0) + v
    return out


def share(part: float, whole: float) -> float | None:
    return part / whole if whole else None


def token_shares(fates: Mapping[str, float]) -> dict[str, float | None]:
    """``prompt_coverage`` (lag0 / all prompt tokens trained) and ``coverage_ceiling``
    (1 - hole / all): what a recording could have covered at best."""
    total = float(sum(fates.values()))
    hole = share(float(fates.get("hole", 0)), total)
    return {"prompt_coverage": share(float(fates.get("lag0", 0)), total),
            "coverage_ceiling": None if hole is None else 1.0 - hole}


def _breakdown_per_token(windows: Sequence[Mapping[str, Any]], tokens: float) -> dict[str, float] | None:
    parts = [w["breakdown_ms"] for w in windows]
    if not parts or any(p is None for p in parts) or not tokens:
        return None
    total = add_counts(parts)
    return {k: total.get(k, 0.0) / tokens for k in BREAKDOWN_PARTS}


def latency_numbers(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    s = summarize_requests(records, 1.0)
    return {"ttft_p50": s["ttft_ms_p50"], "ttft_p95": s["ttft_ms_p95"], "tpot_p50": s["tpot_ms_p50"],
            "radix_hit_rate": radix_hit_rate(records), "requests": s["requests"],
            "failed_requests": s["failed_requests"]}


def arm_summary(blocks: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """An arm's numbers over its blocks (each ``{"records", "window"}``): latencies of every
    request; trainer rates pooled over the blocks' windows (sums over sums)."""
    records = [r for b in blocks for r in b["records"]]
    windows = [b["window"] for b in blocks if b.get("window")]
    seconds = sum(w["seconds"] for w in windows)
    tokens = sum(w["tokens_trained"] for w in windows)
    samples = sum(w["samples_trained"] for w in windows)
    by_lag = add_counts(w["samples_trained_by_lag"] for w in windows)
    fates = add_counts(w["prompt_tokens_by_fate"] for w in windows)
    sat = [(w["saturated_share"], w["seconds"]) for w in windows if w["saturated_share"] is not None]
    out = {"trained_tokens_per_s": share(tokens, seconds), "samples_trained_per_s": share(samples, seconds),
           "train_busy_ms_per_token": share(sum(w["busy_ms"] for w in windows), tokens),
           **latency_numbers(records), "breakdown_ms_per_token": _breakdown_per_token(windows, tokens),
           "blocks": len(blocks), "blocks_with_window": len(windows), "window_s": seconds,
           "rounds": sum(w["rounds"] for w in windows), "tokens_trained": tokens, "samples_trained": samples,
           "graph_samples": sum(w.get("graph_samples", 0) for w in windows),
           "saturated_share": share(sum(s * w for s, w in sat), sum(w for _, w in sat)),
           "lag0_share_samples": share(by_lag.get("0", 0), sum(by_lag.values())),
           "samples_trained_by_lag": by_lag, "prompt_tokens_by_fate": fates,
           "reuse_by_lag": add_counts(w["reuse_by_lag"] for w in windows), **token_shares(fates)}
    return out


def live_ratios(blocks: Sequence[Mapping[str, Any]], treatment: str, control: str) -> list[float]:
    """Per round of blocks holding both arms with a window: treatment / control trained tokens per
    second (rounds where either rate is 0 or missing are left out)."""
    rates: dict[int, dict[str, float]] = {}
    for b in blocks:
        w = b.get("window")
        if w and w["seconds"] > 0:
            rates.setdefault(b["round"], {})[b["arm"]] = w["tokens_trained"] / w["seconds"]
    return [r[treatment] / r[control] for _, r in sorted(rates.items())
            if r.get(treatment) and r.get(control)]


def median_and_spread(values: Sequence[float]) -> tuple[float | None, dict[str, float] | None]:
    if not values:
        return None, None
    return statistics.median(values), {"min": min(values), "max": max(values)}


def publish_intervals(rows: Sequence[Mapping[str, Any]], t_from: float) -> list[float]:
    """Seconds between consecutive round openings after ``t_from`` (one publish closes each round)."""
    opens = [o["t_open"] for o in round_openings(rows, t_from)]
    return [b - a for a, b in zip(opens, opens[1:])]


def store_retention_s(start: Mapping[str, Any], end: Mapping[str, Any], wall_s: float) -> dict[str, Any]:
    """``host_capacity_bytes`` of the store / the recording rate (``bytes_recorded_total`` added
    per second of ``wall_s``): seconds until recordings fill the host pool. None without a
    ``store`` status block or when nothing was recorded."""
    a, b = start.get("store"), end.get("store")
    if not isinstance(a, dict) or not isinstance(b, dict) or wall_s <= 0:
        return {"store_retention_s": None, "recorded_bytes_per_s": None, "store_host_capacity_bytes": None}
    rate = (float(b.get("bytes_recorded_total") or 0) - float(a.get("bytes_recorded_total") or 0)) / wall_s
    cap = b.get("host_capacity_bytes")
    return {"store_retention_s": float(cap) / rate if cap and rate > 0 else None,
            "recorded_bytes_per_s": rate, "store_host_capacity_bytes": cap}
