"""config/: each section validates itself, naming the full dotted key; options the online loop
cannot run (train.gradient_mode response_only, publish.mode adapter) are refused at load."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from alchemist_sgl.config import (Config, LoraConfig, MemoryConfig, PublishConfig, Section, StoreConfig,
                                  TrainConfig, config_from_json, config_to_dict, config_to_json,
                                  load_config)
from alchemist_sgl.config.rules import at_least, key, or_null, within
from alchemist_sgl.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs/cpu-tiny.yaml"


def _leaf_keys(plain: dict, prefix: str = "") -> list[str]:
    """Every dotted key of a resolved config that holds a value (not a section)."""
    keys = []
    for name, value in plain.items():
        if isinstance(value, dict):
            keys += _leaf_keys(value, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


LEAVES = _leaf_keys(config_to_dict(Config()))


def test_the_leaf_walk_covers_every_section() -> None:
    sections = {k.rsplit(".", 1)[0] for k in LEAVES}
    assert sections == {"record", "record.auto", "store", "train", "train.lora", "publish", "publish.gate",
                        "publish.guard", "feedback", "memory", "server"}
    assert {"record.enabled", "train.lora.rank", "publish.gate.every", "memory.offload"} <= set(LEAVES)


@pytest.mark.parametrize("dotted", LEAVES)
def test_a_wrong_type_in_any_section_names_the_full_key(dotted: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"{dotted}={{x: 1}}"])  # a mapping fits no leaf key's type
    assert err.value.key == dotted
    assert f"config key '{dotted}'" in str(err.value)


@pytest.mark.parametrize("override, dotted, phrase", [
    ("record.budget_bytes_per_token=-1", "record.budget_bytes_per_token", "byte count >= 0"),
    ("store.ttl_s=0", "store.ttl_s", "must be > 0"),
    ("store.page_tokens=17", "store.page_tokens", "between 1 and 16"),
    ("train.lora.rank=0", "train.lora.rank", "must be >= 1"),
    ("train.lora.dropout=1.0", "train.lora.dropout", "must be in [0, 1)"),
    ("train.round_max_samples=0", "train.round_max_samples", "must be >= 1"),
    ("train.checkpoint_dir=", "train.checkpoint_dir", "must name a folder"),
    ("publish.keep_adapters_last=0", "publish.keep_adapters_last", "must be >= 1"),
    ("publish.gate.max_regression=-0.5", "publish.gate.max_regression", "must be >= 0"),
    ("publish.guard.min_ratings=0", "publish.guard.min_ratings", "must be >= 1"),
    ("publish.guard.max_increase=-0.1", "publish.guard.max_increase", "must be >= 0"),
    ("publish.guard.alpha=0", "publish.guard.alpha", "must be in (0, 0.5]"),
    ("publish.guard.alpha=0.6", "publish.guard.alpha", "must be in (0, 0.5]"),
    ("feedback.max_body_bytes=1023", "feedback.max_body_bytes", "must be >= 1024"),
    ("feedback.rate_limit_per_minute=0", "feedback.rate_limit_per_minute", "(or null: no limit)"),
    ("memory.kv_usage_high=0", "memory.kv_usage_high", "must be in (0, 1]"),
    ("memory.yield_budget_fraction=1.5", "memory.yield_budget_fraction", "must be in [0, 1]"),
    ("memory.max_transitions_per_minute=2", "memory.max_transitions_per_minute", "must be >= 3"),
    ("server.port=65536", "server.port", "TCP port"),
])
def test_a_value_out_of_range_in_each_section_names_the_full_key(override, dotted, phrase) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert err.value.key == dotted
    assert phrase in str(err.value)


@pytest.mark.parametrize("override", [
    "store.page_tokens=1", "store.page_tokens=16", "train.lora.dropout=0", "memory.kv_usage_high=1",
    "memory.yield_budget_fraction=0", "memory.yield_budget_fraction=1", "memory.ttft_target_ms=null",
    "feedback.rate_limit_per_minute=1", "memory.max_transitions_per_minute=3",
    "publish.guard.alpha=0.5", "publish.guard.max_increase=0", "publish.guard.min_ratings=1"])
def test_the_edges_of_each_range_load(override: str) -> None:
    dotted, text = override.split("=")
    node = config_to_dict(load_config(None, [override]))
    for part in dotted.split("."):
        node = node[part]
    assert node == yaml.safe_load(text)


def test_sections_validate_themselves_with_their_prefix() -> None:
    with pytest.raises(ConfigError) as err:
        StoreConfig(page_tokens=0).validate("store.")
    assert err.value.key == "store.page_tokens"
    with pytest.raises(ConfigError) as err:
        MemoryConfig(kv_usage_high=2.0).validate()
    assert err.value.key == "kv_usage_high"
    with pytest.raises(ConfigError) as err:  # a nested section is checked in place
        Config(train=TrainConfig(lora=LoraConfig(rank=0))).validate()
    assert err.value.key == "train.lora.rank"
    for section in (Config(), *(getattr(Config(), f.name) for f in dataclasses.fields(Config)
                                if f.name != "sglang")):
        section.validate()  # every default passes


def test_the_dropout_rule_spans_sections() -> None:
    with pytest.raises(ConfigError) as err:
        Config(train=TrainConfig(lora=LoraConfig(dropout=0.1))).validate()
    assert err.value.key == "train.lora.dropout" and "publish.mode 'merge'" in str(err.value)
    Config(train=TrainConfig(is_enabled=False, lora=LoraConfig(dropout=0.1))).validate()
    LoraConfig(dropout=0.1).validate("train.lora.")  # the section alone allows it


def test_a_new_key_is_one_line_in_its_section() -> None:
    @dataclass(frozen=True)
    class Demo(Section):
        count: int = key(2, at_least(1))
        share: float = key(0.5, within(0, 1, "(]"))
        limit: int | None = key(None, or_null(at_least(1), "no limit"))
        name: str = key("x")

    Demo().validate("demo.")
    Demo(count=1, share=1.0, limit=1).validate("demo.")
    for bad, dotted, message in [(Demo(count=0), "demo.count", "must be >= 1"),
                                 (Demo(share=0.0), "demo.share", "must be in (0, 1]"),
                                 (Demo(limit=0), "demo.limit", "must be >= 1 (or null: no limit)")]:
        with pytest.raises(ConfigError) as err:
            bad.validate("demo.")
        assert (err.value.key, str(err.value)) == (dotted, f"config key '{dotted}': {message}")


def _refused(loader) -> ConfigError:
    with pytest.raises(ConfigError) as err:
        loader()
    return err.value


def test_response_only_is_refused_at_load_naming_the_online_loop(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(f"base: {TINY}\ntrain:\n  gradient_mode: response_only\n")
    raw = json.loads(config_to_json(load_config(TINY)))
    raw["train"]["gradient_mode"] = "response_only"
    for err in (_refused(lambda: load_config(path)),
                _refused(lambda: load_config(TINY, ["train.gradient_mode=response_only"])),
                _refused(lambda: config_from_json(json.dumps(raw)))):  # the scheduler process's load
        assert err.key == "train.gradient_mode"
        assert "not yet supported in the online loop" in str(err)
    assert load_config(TINY, ["train.gradient_mode=exact"]).train.gradient_mode == "exact"
    # The trainer API still takes it: a TrainConfig built directly is not the server's config.
    assert TrainConfig(gradient_mode="response_only").gradient_mode == "response_only"


def test_publish_mode_adapter_is_refused_with_a_reason() -> None:
    err = _refused(lambda: load_config(TINY, ["publish.mode=adapter"]))
    assert err.key == "publish.mode"
    assert "'adapter' is not built" in str(err) and "merge" in str(err)
    err = _refused(lambda: load_config(TINY, ["publish.mode=sometimes"]))
    assert err.key == "publish.mode" and "['merge']" in str(err)
    assert load_config(TINY, ["publish.mode=merge"]).publish.mode == "merge"
    assert PublishConfig().mode == "merge"
