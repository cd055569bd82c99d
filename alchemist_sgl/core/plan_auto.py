"""``record.plan: auto``: the record plan with the best measured replay ratio that the host pool
can hold for the traffic of the rounds it must keep (pure).

Must not import sglang, torch or package modules other than ``errors`` and ``core``.

Note [Auto plan]: a recording is needed until its version is trained and published (exact replay),
or ``train.max_version_lag`` versions later (approximate replay); the store frees it then
(store/index.py, Note [Demote before evict]). So the host pool must hold the prompt tokens of
``1 + max_version_lag`` rounds: ``round_tokens`` = ``record.auto.prompt_tokens_per_s`` x
``train.round_s`` x (1 + lag). That is an upper bound: prefix dedup stores a shared prompt once.
The candidates are ``graph``, ``full`` and ``down`` (core/plan.py), each with its ratio as
``python -m eval run replay`` measures it (recompute step time / replay step time,
``record.auto.*_ratio``; the defaults are the last measurement in docs/results.md). Taken in
decreasing ratio (ties: fewer bytes per token first), the first candidate whose
``round_tokens x bytes_per_token`` fits ``store.host_bytes`` and that the server does not refuse
(graph needs CPU torch_native attention and unwrapped projections) is the plan. When none fits,
the plan is the candidate with the fewest bytes per token: the store then demotes and evicts, and
coverage drops, rather than recording nothing. ``PlanChoice.as_status`` shows every candidate
with its ratio, round bytes and verdict in ``/alchemist/status`` (``record_plan.chosen_by``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from alchemist_sgl.core.plan import ModelShape, RecordPlan, choose_plan

AUTO_CANDIDATES = ("graph", "full", "down")


@dataclass(frozen=True)
class Candidate:
    """One plan weighed by ``choose_auto``: its measured ratio, bytes for the held rounds, verdict."""

    name: str
    ratio: float
    bytes_per_token: int
    round_bytes: int
    verdict: str  # "chosen", "fits", "too large" or the refusal's reason


@dataclass(frozen=True)
class PlanChoice:
    """The plan in use and how it was chosen."""

    plan: RecordPlan
    rule: str  # "record.plan", "record.budget_bytes_per_token" or "auto: ..."
    round_tokens: int = 0
    host_bytes: int = 0
    candidates: tuple[Candidate, ...] = ()

    def as_status(self) -> dict[str, Any]:
        """The ``record_plan`` entry of ``/alchemist/status``: the plan's, with ``chosen_by``."""
        status: dict[str, Any] = {"rule": self.rule}
        if self.candidates:
            status.update(round_tokens=self.round_tokens, host_bytes=self.host_bytes,
                          candidates=[{"plan": c.name, "ratio": c.ratio, "bytes_per_token": c.bytes_per_token,
                                       "round_bytes": c.round_bytes, "verdict": c.verdict}
                                      for c in self.candidates])
        return {**self.plan.as_status(), "chosen_by": status}


def choose_auto(shape: ModelShape, page_tokens: int, *, ratios: Mapping[str, float], host_bytes: int,
                round_tokens: int, refused: Mapping[str, str]) -> PlanChoice:
    """Note [Auto plan]. ``ratios``: measured ratio per candidate name; ``refused``: reason per
    candidate this server cannot record (e.g. ``{"graph": "..."}``)."""
    plans = {name: choose_plan(shape, name, page_tokens) for name in AUTO_CANDIDATES}
    order = sorted(AUTO_CANDIDATES, key=lambda n: (-ratios[n], plans[n].bytes_per_token))
    fitting = [n for n in order if n not in refused
               and round_tokens * plans[n].bytes_per_token <= host_bytes]
    if fitting:
        chosen, rule = fitting[0], "auto: best measured ratio that holds the rounds"
    else:
        chosen = min((n for n in AUTO_CANDIDATES if n not in refused),
                     key=lambda n: plans[n].bytes_per_token)
        rule = "auto: no plan holds the rounds; fewest bytes per token"

    def verdict(name: str) -> str:
        if name == chosen:
            return "chosen"
        return refused.get(name) or ("fits" if name in fitting else "too large")

    candidates = tuple(Candidate(n, ratios[n], plans[n].bytes_per_token,
                                 round_tokens * plans[n].bytes_per_token, verdict(n)) for n in order)
    return PlanChoice(plans[chosen], rule, round_tokens, host_bytes, candidates)
