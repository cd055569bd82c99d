"""Configuration: YAML files plus ``--set a.b=c`` overrides, loaded into frozen dataclasses.

Owns the schema of every section (INTERFACES.md, "Configs"). Unknown keys and bad values raise
``ConfigError`` naming the dotted key. The ``sglang`` section is passed verbatim to SGLang's server
arguments and is only checked here for being a mapping; ``integration/`` checks its keys against
SGLang's own parser. Must not import sglang, torch or any other package module but ``errors``.

A config file may name a base file with ``base: other.yaml`` (relative to itself); the file's
sections are deep-merged over the base's.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml

from alchemist_sgl.errors import ConfigError


RECORD_TENSORS = ("qkv", "o", "gate_up", "down")


@dataclass(frozen=True)
class RecordConfig:
    is_enabled: bool = True
    # "full" (default), one name or a list of RECORD_TENSORS; see record/plan.py for why full.
    plan: str | tuple[str, ...] = "full"
    budget_bytes_per_token: int | str | None = None  # greedy by bytes/token instead; null: ``plan``

    @property
    def plan_choice(self) -> int | str | tuple[str, ...]:
        """The argument of ``record.plan.choose_plan``."""
        return self.budget_bytes_per_token if self.budget_bytes_per_token is not None else self.plan


@dataclass(frozen=True)
class StoreConfig:
    host_bytes: int = 2 * 1024**3
    device_bytes: int = 0
    page_tokens: int = 16
    ttl_s: float = 3600.0
    # Prefix dedup of recordings (pages shared across requests); off only for the dedup experiment.
    dedup: bool = True


@dataclass(frozen=True)
class LoraConfig:
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass(frozen=True)
class TrainConfig:
    is_enabled: bool = True
    replay: bool = True
    gradient_mode: Literal["exact", "response_only"] = "exact"
    max_version_lag: int = 0
    # Run the trainer's decoder layers through torch.compile, compiled before serving starts
    # (alchemist_sgl/train/layer.py, Note [Compiled layer]).
    compile: bool = False
    # Work-unit time per scheduler iteration while requests wait or run (adds to their TPOT).
    slice_budget_ms: float = 30.0
    # Work-unit time per scheduler iteration while nothing is waiting or running.
    idle_slice_ms: float = 500.0
    lora: LoraConfig = field(default_factory=LoraConfig)
    objective_negative: Literal["unlikelihood", "kto"] = "unlikelihood"
    learning_rate: float = 1e-4
    # Rounds (online/loop.py, Note [Rounds]): one optimizer step per served version. A round
    # closes at round_s seconds or round_max_samples samples, whichever first, never empty.
    round_s: float = 60.0
    round_max_samples: int = 64
    stale_max_age_s: float = 600.0  # a stale sample pending longer is deferred (feedback) or dropped
    max_pending_samples: int = 1024  # queue bound: POST /alchemist/train/samples answers 429 beyond
    loss_chunk_rows: int = 256      # LM head + loss run in chunks of at most this many rows
    checkpoint_dir: str = "var/checkpoints"
    checkpoint_every_s: float = 300.0  # a checkpoint after the first round that ends this long after the last
    seed: int = 0


@dataclass(frozen=True)
class GateConfig:
    is_enabled: bool = False
    # JSONL of {"prompt": str, "response": str}; None = the packaged held-out set.
    heldout_path: str | None = None
    max_regression: float = 0.05        # nats/token worse than the last accepted version
    max_regression_total: float = 0.2   # nats/token worse than v0
    every: int = 1                      # score every N-th publish


@dataclass(frozen=True)
class PublishConfig:
    mode: Literal["merge", "adapter"] = "merge"
    every_steps: int = 1    # one publish per round: only 1 is accepted (Note [Rounds])
    gate: GateConfig = field(default_factory=GateConfig)
    keep_adapters_last: int = 5   # adapter folders kept: the last N ...
    keep_adapters_every: int = 10  # ... plus every k-th version


@dataclass(frozen=True)
class FeedbackConfig:
    db_path: str = "var/feedback.sqlite"
    max_body_bytes: int = 1024 * 1024
    api_key: str | None = None
    max_pending: int = 10_000
    completion_ttl_s: float = 24 * 3600.0
    rate_limit_per_minute: int | None = None  # per API key (or client host): 429 beyond
    poll_every_s: float = 0.5                 # the scheduler's poll of new feedback


@dataclass(frozen=True)
class MemoryConfig:
    """The memory arbiter's policy (Note [Arbiter policy] in memory.py)."""
    is_enabled: bool = True
    waiting_requests_high: int = 4
    kv_usage_high: float = 0.85
    train_budget_bytes: int = 512 * 1024**2
    # A spike also when the arrival-rate EMA reaches this (null: arrivals never signal a spike).
    arrival_rate_high_per_s: float | None = 4.0
    arrival_ema_tau_s: float = 5.0         # time constant of that EMA
    # A spike also when recent TTFT exceeds this while requests are in flight (null: ignored).
    ttft_target_ms: float | None = 2000.0
    recover_fraction: float = 0.5          # recovery needs every signal below this x its mark ...
    min_dwell_s: float = 2.0               # ... for this long, and this long in the state
    max_transitions_per_minute: int = 12   # in any 60 s window (spike entries included)
    pause_after_s: float = 10.0            # YIELDING -> PAUSED after pressure lasts this long
    yield_budget_fraction: float = 0.25    # YIELDING keeps this share of train_budget_bytes
    # Move each forward unit's saved tensors to host after it and back before its backward
    # (alchemist_sgl/train/offload.py, Note [Saved-tensor offload]); off: they stay resident.
    offload: bool = False


@dataclass(frozen=True)
class ServerConfig:
    # A prepared model name (see ``alchemist-sgl prepare``) or a path to a HF model folder.
    model: str = "smollm2-135m-instruct"
    served_model_name: str = "smollm2"
    host: str = "127.0.0.1"
    port: int = 30000
    cache_dir: str = "var/models"
    # Registers test/debug control commands (e.g. reading recordings back); off in production.
    enable_debug_commands: bool = False


@dataclass(frozen=True)
class Config:
    sglang: Mapping[str, Any] = field(default_factory=lambda: types.MappingProxyType({}))
    record: RecordConfig = field(default_factory=RecordConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    publish: PublishConfig = field(default_factory=PublishConfig)
    feedback: FeedbackConfig = field(default_factory=FeedbackConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    server: ServerConfig = field(default_factory=ServerConfig)


# YAML spells booleans as in INTERFACES.md (``record.enabled``); the dataclasses say ``is_enabled``.
_ALIASES = {"enabled": "is_enabled"}
_REVERSE_ALIASES = {v: k for k, v in _ALIASES.items()}


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Loads ``path`` (or the defaults when None), applies ``a.b=c`` overrides, validates.

    Raises ConfigError naming the dotted key for unknown keys and bad values.
    """
    raw: dict[str, Any] = _read_yaml(Path(path)) if path is not None else {}
    for item in overrides:
        _apply_override(raw, item)
    return _build(Config, raw, "")


def config_to_dict(config: Config) -> dict[str, Any]:
    """The resolved config as plain data with YAML spellings (for logs and experiment records)."""

    def convert(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {_REVERSE_ALIASES.get(f.name, f.name): convert(getattr(value, f.name))
                    for f in dataclasses.fields(value)}
        if isinstance(value, Mapping):
            return {k: convert(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [convert(v) for v in value]
        return value

    return convert(config)


def config_to_json(config: Config) -> str:
    return json.dumps(config_to_dict(config), sort_keys=True)


def config_from_json(text: str) -> Config:
    return _build(Config, json.loads(text), "")


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError("<file>", f"config file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError("base", f"config files include each other: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError("<file>", f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError("<file>", f"{path} must hold a mapping of sections")
    base_name = data.pop("base", None)
    if base_name is None:
        return data
    base = _read_yaml(path.parent / str(base_name), seen + (path.resolve(),))
    return _deep_merge(base, data)


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _apply_override(raw: dict[str, Any], item: str) -> None:
    if "=" not in item:
        raise ConfigError(item, "an override must read a.b=value")
    dotted, text = item.split("=", 1)
    parts = [p for p in dotted.strip().split(".") if p]
    if len(parts) < 2:
        raise ConfigError(dotted, "an override names a section and a key, e.g. train.replay=false")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(dotted, f"'{part}' is not a section")
        node = child
    node[parts[-1]] = yaml.safe_load(text) if text != "" else ""


_ROUNDS = ("retired by rounds (one optimizer step per served version): set train.round_s "
           "and train.round_max_samples instead")
_RETIRED = {"train.batch_samples": _ROUNDS, "train.min_pending_samples": _ROUNDS,
            "train.max_wait_s": _ROUNDS, "publish.every_s": _ROUNDS,
            "train.checkpoint_every_steps": "retired by rounds: checkpoints are time-based, set "
                                            "train.checkpoint_every_s instead"}


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, Mapping):
        raise ConfigError(prefix or "<root>", f"expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        name = _ALIASES.get(str(key), str(key))
        dotted = f"{prefix}{key}"
        if dotted in _RETIRED:
            raise ConfigError(dotted, _RETIRED[dotted])
        if name not in fields:
            known = ", ".join(sorted(_REVERSE_ALIASES.get(n, n) for n in fields))
            raise ConfigError(dotted, f"unknown key (known here: {known})")
        kwargs[name] = _coerce(hints[name], value, dotted)
    try:
        obj = cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(prefix.rstrip(".") or "<root>", str(exc)) from exc
    _validate(obj, prefix)
    return obj


def _coerce(hint: Any, value: Any, dotted: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value if value is not None else {}, dotted + ".")
    if hint is Any:
        return value
    if origin in (Mapping, collections.abc.Mapping) or hint is dict:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise ConfigError(dotted, "expected a mapping")
        return types.MappingProxyType(dict(value))
    if origin is Literal:
        if value not in args:
            raise ConfigError(dotted, f"must be one of {list(args)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in args:
            if option is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(option, value, dotted)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(dotted, f"{value!r} fits none of {hint}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(dotted, "expected a list")
        return tuple(_coerce(args[0], v, f"{dotted}[{i}]") for i, v in enumerate(value))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(dotted, f"expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(dotted, f"expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(dotted, f"expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(dotted, f"expected a string, got {value!r}")
        return value
    raise ConfigError(dotted, f"unsupported type {hint}")


def _validate(obj: Any, prefix: str) -> None:
    """Range checks that types alone do not express."""

    def need(ok: bool, key: str, message: str) -> None:
        if not ok:
            raise ConfigError(prefix + key, message)

    if isinstance(obj, RecordConfig):
        budget, plan = obj.budget_bytes_per_token, obj.plan
        need(budget is None or budget == "full" or (isinstance(budget, int) and budget >= 0),
             "budget_bytes_per_token", f"must be a byte count >= 0 or 'full', got {budget!r}")
        names = (plan,) if isinstance(plan, str) else plan
        need(plan == "full" or (bool(names) and len(set(names)) == len(names)
                                and all(n in RECORD_TENSORS for n in names)),
             "plan", f"must be 'full', one of {list(RECORD_TENSORS)} or a list of distinct names "
             f"from it, got {plan!r}")
        need(budget is None or plan == "full", "budget_bytes_per_token",
             "set record.plan or record.budget_bytes_per_token, not both")
    elif isinstance(obj, StoreConfig):
        need(1 <= obj.page_tokens <= 16, "page_tokens", "must be between 1 and 16")
        need(obj.host_bytes >= 0, "host_bytes", "must be >= 0")
        need(obj.device_bytes >= 0, "device_bytes", "must be >= 0")
        need(obj.ttl_s > 0, "ttl_s", "must be > 0")
    elif isinstance(obj, LoraConfig):
        need(obj.rank >= 1, "rank", "must be >= 1")
        need(0.0 <= obj.dropout < 1.0, "dropout", "must be in [0, 1)")
        allowed = {"q", "k", "v", "o", "gate", "up", "down"}
        bad = [t for t in obj.targets if t not in allowed]
        need(not bad, "targets", f"unknown targets {bad}; allowed: {sorted(allowed)}")
    elif isinstance(obj, TrainConfig):
        need(obj.max_version_lag >= 0, "max_version_lag", "must be >= 0")
        need(obj.slice_budget_ms > 0, "slice_budget_ms", "must be > 0")
        need(obj.learning_rate > 0, "learning_rate", "must be > 0")
        need(obj.round_s > 0, "round_s", "must be > 0")
        need(obj.round_max_samples >= 1, "round_max_samples", "must be >= 1")
        need(obj.stale_max_age_s > 0, "stale_max_age_s", "must be > 0")
        need(obj.idle_slice_ms > 0, "idle_slice_ms", "must be > 0")
        need(obj.max_pending_samples >= 1, "max_pending_samples", "must be >= 1")
        need(obj.loss_chunk_rows >= 1, "loss_chunk_rows", "must be >= 1")
        need(obj.checkpoint_every_s >= 0, "checkpoint_every_s", "must be >= 0")
        need(bool(obj.checkpoint_dir), "checkpoint_dir", "must name a folder")
    elif isinstance(obj, PublishConfig):
        need(obj.every_steps == 1, "every_steps", "must be 1: a round takes one optimizer step and "
             "publishes it, so that every sample served at a version trains at lag 0 (train.round_s "
             "and train.round_max_samples set how much a step takes)")
        need(obj.mode == "merge", "mode", "only 'merge' is built: the served weights are rebuilt "
             "from the master copy after each step ('adapter' is not available yet)")
        need(obj.keep_adapters_last >= 1, "keep_adapters_last", "must be >= 1")
        need(obj.keep_adapters_every >= 1, "keep_adapters_every", "must be >= 1")
    elif isinstance(obj, GateConfig):
        need(obj.max_regression >= 0, "max_regression", "must be >= 0")
        need(obj.max_regression_total >= 0, "max_regression_total", "must be >= 0")
        need(obj.every >= 1, "every", "must be >= 1")
    elif isinstance(obj, FeedbackConfig):
        need(obj.max_body_bytes >= 1024, "max_body_bytes", "must be >= 1024")
        need(obj.max_pending >= 1, "max_pending", "must be >= 1")
        need(obj.completion_ttl_s > 0, "completion_ttl_s", "must be > 0")
        need(obj.rate_limit_per_minute is None or obj.rate_limit_per_minute >= 1,
             "rate_limit_per_minute", "must be >= 1 (or null: no limit)")
        need(obj.poll_every_s > 0, "poll_every_s", "must be > 0")
    elif isinstance(obj, MemoryConfig):
        need(0.0 < obj.kv_usage_high <= 1.0, "kv_usage_high", "must be in (0, 1]")
        need(obj.waiting_requests_high >= 1, "waiting_requests_high", "must be >= 1")
        need(obj.train_budget_bytes >= 0, "train_budget_bytes", "must be >= 0")
        need(obj.arrival_rate_high_per_s is None or obj.arrival_rate_high_per_s > 0,
             "arrival_rate_high_per_s", "must be > 0 (or null: arrivals never signal a spike)")
        need(obj.arrival_ema_tau_s > 0, "arrival_ema_tau_s", "must be > 0")
        need(obj.ttft_target_ms is None or obj.ttft_target_ms > 0,
             "ttft_target_ms", "must be > 0 (or null: TTFT never signals a spike)")
        need(0.0 < obj.recover_fraction <= 1.0, "recover_fraction", "must be in (0, 1]")
        need(obj.min_dwell_s >= 0, "min_dwell_s", "must be >= 0")
        need(obj.max_transitions_per_minute >= 3, "max_transitions_per_minute",
             "must be >= 3: a recovery reserves room for the spike entry and the pause that "
             "may follow it (Note [Arbiter policy] in memory.py)")
        need(obj.pause_after_s > 0, "pause_after_s", "must be > 0")
        need(0.0 <= obj.yield_budget_fraction <= 1.0, "yield_budget_fraction", "must be in [0, 1]")
    elif isinstance(obj, Config):
        # Note [merge needs no dropout]: the trainer's forward W_pub x + s*B(Ax) - s*B_pub(A_pub x)
        # is exact only if both LoRA branches see the same x; dropout on one of them breaks it.
        need(not (obj.train.is_enabled and obj.publish.mode == "merge" and obj.train.lora.dropout > 0),
             "train.lora.dropout", "must be 0 with publish.mode 'merge' (the published and trained "
             "LoRA branches must see the same input)")
    elif isinstance(obj, ServerConfig):
        need(1 <= obj.port <= 65535, "port", "must be a TCP port")
        need(bool(obj.model), "model", "must name a prepared model or a folder")
