"""Config loading: YAML + overrides into frozen dataclasses; errors name the dotted key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from alchemist_sgl.config import Config, config_from_json, config_to_json, load_config
from alchemist_sgl.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_shipped_configs_load() -> None:
    smol = load_config(REPO / "configs/cpu-smollm2.yaml")
    tiny = load_config(REPO / "configs/cpu-tiny.yaml")
    assert smol.server.model == "smollm2-135m-instruct"
    assert tiny.server.model == "tiny"
    assert tiny.train.round_max_samples == 1 and tiny.publish.every_steps == 1
    assert (smol.train.round_s, smol.train.round_max_samples) == (60.0, 64)
    assert smol.train.stale_max_age_s == 600.0
    fp32 = load_config(REPO / "configs/cpu-smollm2-fp32.yaml")
    assert fp32.sglang["dtype"] == "float32" and fp32.server.model == smol.server.model
    assert fp32.store.host_bytes == 3 * smol.store.host_bytes
    graph = load_config(REPO / "configs/cpu-smollm2-fp32-graph.yaml")
    assert graph.record.plan == "graph" and graph.sglang["dtype"] == "float32"
    for config in (smol, tiny):
        assert config.sglang["device"] == "cpu"
        assert config.sglang["max-total-tokens"] > 0, "the KV pool is bounded on CPU"
        assert config.sglang["sleep-on-idle"] is True


def test_base_merge_and_overrides(tmp_path: Path) -> None:
    base = tmp_path / "base.yaml"
    base.write_text("train:\n  replay: true\n  lora:\n    rank: 8\nsglang:\n  device: cpu\n")
    top = tmp_path / "top.yaml"
    top.write_text("base: base.yaml\ntrain:\n  lora:\n    alpha: 4\n")
    config = load_config(top, ["train.replay=false", "sglang.max-total-tokens=2048", "store.ttl_s=5"])
    assert config.train.replay is False
    assert config.train.lora.rank == 8 and config.train.lora.alpha == 4.0
    assert dict(config.sglang) == {"device": "cpu", "max-total-tokens": 2048}
    assert config.store.ttl_s == 5.0


def test_config_is_frozen() -> None:
    config = load_config(None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.train.replay = False  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.sglang["device"] = "cuda"  # type: ignore[index]


@pytest.mark.parametrize("text, key", [
    ("recorder:\n  enabled: true\n", "recorder"),
    ("record:\n  enabled: 3\n", "record.enabled"),
    ("train:\n  gradient_mode: approximate\n", "train.gradient_mode"),
    ("train:\n  lora:\n    targets: [q, z]\n", "train.lora.targets"),
    ("store:\n  page_tokens: 0\n", "store.page_tokens"),
    ("record:\n  budget_bytes_per_token: lots\n", "record.budget_bytes_per_token"),
    ("sglang: [1, 2]\n", "sglang"),
    ("server:\n  port: 70000\n", "server.port"),
])
def test_errors_name_the_dotted_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, text))
    assert err.value.key == key
    assert f"'{key}'" in str(err.value)


def test_bad_override_syntax() -> None:
    with pytest.raises(ConfigError, match="a.b=value"):
        load_config(None, ["train.replay"])
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.nope=1"])
    assert err.value.key == "train.nope"


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml")


def test_json_round_trip_keeps_every_value() -> None:
    config = load_config(REPO / "configs/cpu-tiny.yaml", ["train.lora.rank=4", "record.enabled=false"])
    again = config_from_json(config_to_json(config))
    assert isinstance(again, Config)
    assert again == config


@pytest.mark.parametrize("key, value, names", [
    ("train.batch_samples", "4", "train.round_s and train.round_max_samples"),
    ("train.min_pending_samples", "1", "train.round_s and train.round_max_samples"),
    ("train.max_wait_s", "30", "train.round_s and train.round_max_samples"),
    ("publish.every_s", "300", "train.round_s and train.round_max_samples"),
    ("train.checkpoint_every_steps", "10", "train.checkpoint_every_s"),
    ("publish.every_steps", "2", "train.round_s and train.round_max_samples"),
])
def test_keys_retired_by_rounds_stop_startup_naming_the_new_keys(key, value, names) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as e:
        load_config(REPO / "configs/cpu-tiny.yaml", [f"{key}={value}"])
    assert names in str(e.value)
