"""config/, record section: the packaged plans, named plans, the optional byte budget, errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from alchemist_sgl.config import RECORD_TENSORS, load_config
from alchemist_sgl.errors import ConfigError
from alchemist_sgl.core.plan import TENSOR_ORDER, ModelShape
from alchemist_sgl.record.plan_choice import plan_for

REPO = Path(__file__).resolve().parents[2]
SHAPE = ModelShape(hidden=8, heads=2, kv_heads=1, head_dim=4, intermediate=16, layers=3,
                   dtype_bytes=4)


def test_config_names_the_plan_tensors() -> None:
    assert RECORD_TENSORS == TENSOR_ORDER  # config/ may not import core/plan.py


@pytest.mark.parametrize("path", [None, *sorted((REPO / "configs").glob("*.yaml"))])
def test_every_packaged_config_names_its_plan_rule(path: Path | None) -> None:
    """The tiny test model records the four projections, the config named for the graph plan also
    the attention output and lse; every other shipped config (and the schema) chooses ``auto``."""
    config = load_config(path)
    name = "none" if path is None else path.name
    want = {"cpu-tiny.yaml": ("record.plan", TENSOR_ORDER),
            "cpu-smollm2-fp32-graph.yaml": ("record.plan", (*TENSOR_ORDER, "attn", "lse"))}
    choice = plan_for(config, SHAPE)
    if name in want:
        assert (choice.rule, choice.plan.tensors) == want[name]
    else:
        assert config.record.plan == "auto" and choice.rule.startswith("auto: ")


@pytest.mark.parametrize("override, tensors", [
    ("record.plan=down", ("down",)),
    ("record.plan=[down, qkv]", ("qkv", "down")),
    ("record.budget_bytes_per_token=96", ("down",)),   # 3 layers x width 8 x 4 bytes
    ("record.budget_bytes_per_token=full", TENSOR_ORDER),
    ("record.plan=graph", (*TENSOR_ORDER, "attn", "lse")),
])
def test_restricted_plans_by_name_or_budget(override: str, tensors: tuple) -> None:
    assert plan_for(load_config(None, [override]), SHAPE).plan.tensors == tensors


@pytest.mark.parametrize("overrides, key", [
    (["record.plan=mlp"], "record.plan"),
    (["record.plan=[down, down]"], "record.plan"),
    (["record.plan=[down, attn]"], "record.plan"),
    (["record.plan=[graph]"], "record.plan"),
    (["record.plan=[]"], "record.plan"),
    (["record.plan=3"], "record.plan"),
    (["record.budget_bytes_per_token=lots"], "record.budget_bytes_per_token"),
    (["record.budget_bytes_per_token=-1"], "record.budget_bytes_per_token"),
    (["record.plan=down", "record.budget_bytes_per_token=100"], "record.budget_bytes_per_token"),
])
def test_bad_record_settings_name_the_key(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert err.value.key == key
