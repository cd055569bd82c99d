"""record.plan auto (core/plan_auto.py, Note [Auto plan]; record/plan_choice.py): the best measured
ratio that the host pool holds for the rounds' traffic, the verdict per candidate, the fallback."""

from __future__ import annotations

from pathlib import Path

import pytest

from alchemist_sgl.config import load_config
from alchemist_sgl.core.plan import GRAPH_TENSORS, TENSOR_ORDER, ModelShape, choose_plan
from alchemist_sgl.core.plan_auto import choose_auto
from alchemist_sgl.record.plan_choice import plan_for

REPO = Path(__file__).resolve().parents[2]
# SmolLM2-135M in bf16: 30 layers; graph 346,680 B/token, full 311,040, down 34,560.
SMOLLM2 = ModelShape(hidden=576, heads=9, kv_heads=3, head_dim=64, intermediate=1536, layers=30,
                     dtype_bytes=2)
RATIOS = {"graph": 1.4, "full": 1.2, "down": 1.0}


def _bytes(name: str) -> int:
    return choose_plan(SMOLLM2, name).bytes_per_token


def test_byte_counts_the_tests_rely_on() -> None:
    assert (_bytes("graph"), _bytes("full"), _bytes("down")) == (346_680, 311_040, 34_560)


def test_best_ratio_that_fits_is_chosen_and_every_candidate_says_why() -> None:
    tokens = 1000
    choice = choose_auto(SMOLLM2, 16, ratios=RATIOS, host_bytes=tokens * _bytes("graph"),
                         round_tokens=tokens, refused={})
    assert choice.plan.tensors == GRAPH_TENSORS
    status = choice.as_status()
    assert status["tensors"] == list(GRAPH_TENSORS)
    rows = status["chosen_by"]["candidates"]
    assert [(r["plan"], r["verdict"]) for r in rows] == [("graph", "chosen"), ("full", "fits"),
                                                         ("down", "fits")]
    assert rows[0]["round_bytes"] == tokens * 346_680 and status["chosen_by"]["round_tokens"] == tokens


def test_a_pool_one_byte_short_of_the_graph_rounds_takes_the_next_ratio() -> None:
    tokens = 1000
    choice = choose_auto(SMOLLM2, 16, ratios=RATIOS, host_bytes=tokens * _bytes("graph") - 1,
                         round_tokens=tokens, refused={})
    assert choice.plan.tensors == TENSOR_ORDER
    verdicts = {r["plan"]: r["verdict"] for r in choice.as_status()["chosen_by"]["candidates"]}
    assert verdicts == {"graph": "too large", "full": "chosen", "down": "fits"}


def test_a_refused_graph_plan_is_passed_over_with_its_reason() -> None:
    choice = choose_auto(SMOLLM2, 16, ratios=RATIOS, host_bytes=2**40, round_tokens=10,
                         refused={"graph": "needs torch_native"})
    assert choice.plan.tensors == TENSOR_ORDER
    assert choice.as_status()["chosen_by"]["candidates"][0]["verdict"] == "needs torch_native"


def test_when_nothing_holds_the_rounds_the_fewest_bytes_are_recorded() -> None:
    choice = choose_auto(SMOLLM2, 16, ratios=RATIOS, host_bytes=10 * _bytes("down") - 1,
                         round_tokens=10, refused={})
    assert choice.plan.tensors == ("down",)
    assert choice.rule.startswith("auto: no plan holds the rounds")


def test_equal_ratios_take_the_fewer_bytes_and_a_better_down_ratio_wins() -> None:
    tie = choose_auto(SMOLLM2, 16, ratios={"graph": 1.2, "full": 1.2, "down": 1.0}, host_bytes=2**40,
                      round_tokens=10, refused={})
    assert tie.plan.tensors == TENSOR_ORDER
    down = choose_auto(SMOLLM2, 16, ratios={"graph": 1.2, "full": 1.2, "down": 1.3},
                       host_bytes=2**40, round_tokens=10, refused={})
    assert down.plan.tensors == ("down",)


def test_the_config_sizes_the_rounds_from_rate_round_length_and_lag() -> None:
    base = ["record.plan=auto", "record.auto.prompt_tokens_per_s=50", "train.round_s=30",
            "record.auto.graph_ratio=1.5"]
    lag0 = plan_for(load_config(None, base), SMOLLM2).as_status()["chosen_by"]
    lag2 = plan_for(load_config(None, [*base, "train.max_version_lag=2"]), SMOLLM2).as_status()
    assert lag0["round_tokens"] == 50 * 30 and lag2["chosen_by"]["round_tokens"] == 3 * 50 * 30
    assert lag0["host_bytes"] == load_config(None, base).store.host_bytes
    small = load_config(None, [*base, f"store.host_bytes={1500 * 346_680 - 1}"])
    assert plan_for(small, SMOLLM2).plan.tensors == TENSOR_ORDER  # graph no longer fits


@pytest.mark.parametrize("overrides, rule, tensors", [
    (["record.plan=down"], "record.plan", ("down",)),
    (["record.plan=graph"], "record.plan", GRAPH_TENSORS),
    (["record.budget_bytes_per_token=34560"], "record.budget_bytes_per_token", ("down",)),
])
def test_an_explicit_plan_or_budget_is_used_as_given(overrides: list[str], rule: str,
                                                     tensors: tuple[str, ...]) -> None:
    choice = plan_for(load_config(None, overrides), SMOLLM2, {"graph": "ignored: explicit"})
    assert (choice.rule, choice.plan.tensors) == (rule, tensors)
    assert "candidates" not in choice.as_status()["chosen_by"]


def test_auto_is_the_default_and_the_bad_ratio_is_named() -> None:
    assert load_config(None).record.plan == "auto"
    with pytest.raises(Exception) as err:
        load_config(None, ["record.auto.graph_ratio=0"])
    assert getattr(err.value, "key", None) == "record.auto.graph_ratio"
