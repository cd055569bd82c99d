"""The record plan a server uses, from its config: ``record.plan`` or the byte budget as given, or
``auto`` resolved against the host pool and the rounds' traffic (core/plan_auto.py, Note [Auto
plan]). The one place both the server (integration/capture_hooks.py) and the benchmarks read it.
"""

from __future__ import annotations

from typing import Mapping

from alchemist_sgl.config import Config
from alchemist_sgl.core.plan import ModelShape, choose_plan
from alchemist_sgl.core.plan_auto import PlanChoice, choose_auto


def plan_for(config: Config, shape: ModelShape, refused: Mapping[str, str] | None = None) -> PlanChoice:
    """The plan for a model of ``shape`` served under ``config``; ``refused``: reason per plan
    name this server cannot record (only ``auto`` weighs it; an explicit plan is refused by the
    caller). Raises ConfigError naming the key for a bad explicit plan."""
    record, page = config.record, config.store.page_tokens
    if record.budget_bytes_per_token is not None:
        return PlanChoice(choose_plan(shape, record.budget_bytes_per_token, page),
                          "record.budget_bytes_per_token")
    if record.plan != "auto":
        return PlanChoice(choose_plan(shape, record.plan, page), "record.plan")
    rounds = 1 + config.train.max_version_lag
    round_tokens = int(record.auto.prompt_tokens_per_s * config.train.round_s * rounds)
    return choose_auto(shape, page, ratios=record.auto.ratios, host_bytes=config.store.host_bytes,
                       round_tokens=round_tokens, refused=dict(refused or {}))
