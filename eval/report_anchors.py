"""The report's first table: each headline result beside its target, the paper's anchor and the
ideal the same run measured, and the machine it ran on.

Owns ``HEADLINES`` (which field of which experiment's JSON is a headline, and against what) and
``headline_rows`` / ``machine_lines``, used by report.py. The paper's anchors are the published
claims this product is measured against: 1.72x training throughput against a separate trainer,
47% less training memory, 2x the training tokens under the same memory, and negligible serving
cost. A field is read by a dotted path; a ratio of two fields is written ``a/b``. A missing field
or experiment leaves its row out: the table shows only what DIR holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping


@dataclass(frozen=True)
class Headline:
    experiment: str  # the JSON file's stem
    what: str
    path: str  # dotted field path, or "a/b" for the ratio of two such fields
    target: str
    anchor: str  # the paper's claim it answers ("" when none)
    ideal: str | None = None  # dotted path of the same run's ideal, if it measures one


HEADLINES = (
    Headline("replay", "replay training tokens/s / HF + PEFT eager",
             "tokens_per_s_replay/tokens_per_s_hf_reference", ">= 1.72", "1.72x training throughput"),
    Headline("replay", "recompute / replay step (default plan)", "ratio", "", "",
             ideal="ideal_ratio"),
    Headline("replay", "recompute / graph replay step", "per_plan.graph.ratio", ">= 1.35 fp32", "",
             ideal="per_plan.graph.ideal_ratio"),
    Headline("memory", "training's peak saved bytes, reduction with offload", "reduction", ">= 0.47",
             "-47% training memory"),
    Headline("memory", "largest step under the same memory, offload / none", "tokens_ratio", ">= 2",
             "2x training tokens"),
    Headline("record-overhead", "TTFT p50, recording on / off", "ttft_p50_ratio", "<= 1.10",
             "negligible serving cost"),
    Headline("record-overhead", "TPOT p50, recording on / off", "tpot_p50_ratio", "<= 1.05",
             "negligible serving cost"),
    Headline("spike", "TTFT p95 with training / serving only", "ratio", "<= 1.25",
             "negligible serving cost"),
    Headline("online", "TPOT p50 with training / serving only",
             "tpot_p50_training_on/tpot_p50_training_off", "<= 1.5", "negligible serving cost"),
    Headline("online", "live trained tokens/s, replay / recompute", "live_ratio", ">= 1.2",
             "1.72x training throughput"),
    Headline("cadence", "lag-0 share of trained samples", "lag0_share_samples", ">= 0.55", ""),
    Headline("dedup", "multi-turn stored bytes, without / with dedup",
             "multi_turn.ratio", "", "", ideal="multi_turn.ideal_ratio"),
    Headline("dedup", "shared system prompt stored bytes, without / with dedup",
             "shared_system_prompt.ratio", "", "", ideal="shared_system_prompt.ideal_ratio"),
)


def field(result: Mapping[str, Any], path: str) -> float | None:
    """The number at dotted ``path`` (``a/b``: their ratio), or None when absent or not a number."""
    if "/" in path:
        top, bottom = (field(result, p) for p in path.split("/", 1))
        return top / bottom if top is not None and bottom else None
    node: Any = result
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return float(node) if isinstance(node, (int, float)) and not isinstance(node, bool) else None


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.3g}"


def headline_rows(results: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Markdown table rows (header included) of every headline found in ``results`` (by stem)."""
    rows = ["| experiment | what | measured | target | ideal (same run) | paper anchor |",
            "|---|---|---|---|---|---|"]
    for h in HEADLINES:
        result = results.get(h.experiment)
        value = None if result is None else field(result, h.path)
        if value is None:
            continue
        ideal = field(result, h.ideal) if h.ideal is not None and result is not None else None
        rows.append(f"| `{h.experiment}` | {h.what} | {_fmt(value)} | {h.target} | {_fmt(ideal)} "
                    f"| {h.anchor} |")
    return rows if len(rows) > 2 else []


def machine_lines(metas: list[Mapping[str, Any]]) -> list[str]:
    """Where the results ran, from the runs' ``meta.environment`` (one line per distinct machine)."""
    seen = sorted({(str(env.get("cpu_model", "CPU model not recorded")), str(env.get("cpu_count")),
                    str(env.get("platform")), str(env.get("gpu") or "no GPU"))
                   for env in (m.get("environment") for m in metas) if isinstance(env, Mapping)})
    return [f"- {model}, {cpus} CPUs, {gpu}; {plat}" for model, cpus, plat, gpu in seen]
