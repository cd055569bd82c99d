"""The schema: one frozen dataclass per config section, each key with its default and its rule.

Owns every section's keys (docs/configuration.md), the checks that span several keys of a section
(``Section.problems``), the keys retired from the schema (``RETIRED_KEYS``) and the values it
refuses with a reason (``REFUSED_VALUES``). Adding a key is one line in its section:
``name: type = key(default, rule)``. Must not import sglang, torch or any package module but
``errors`` and this package.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal, Mapping

from alchemist_sgl.config.rules import Rule, Section, above, at_least, key, or_null, within

RECORD_TENSORS = ("qkv", "o", "gate_up", "down")
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")

_POSITIVE = above(0)
_COUNT = at_least(1)
_BYTES = at_least(0)


def _is_plan(plan: str | tuple[str, ...]) -> bool:
    names = (plan,) if isinstance(plan, str) else plan
    return plan in ("auto", "full", "graph") or (bool(names) and len(set(names)) == len(names)
                              and all(n in RECORD_TENSORS for n in names))


_PLAN = Rule(_is_plan, f"must be 'auto', 'full', 'graph', one of {list(RECORD_TENSORS)} or a list of distinct names "
                       "from it", is_value_shown=True)
_BUDGET = Rule(lambda b: b is None or b == "full" or (isinstance(b, int) and b >= 0),
               "must be a byte count >= 0 or 'full'", is_value_shown=True)


@dataclass(frozen=True)
class AutoPlanConfig(Section):
    """``record.plan: auto`` (core/plan_auto.py, Note [Auto plan])."""
    # The prompt tokens per second the server is expected to prefill: sizes the rounds the host
    # pool must hold. The default suits a 2-core CPU serving SmolLM2; set yours.
    prompt_tokens_per_s: float = key(100.0, _POSITIVE)
    # Recompute step time / replay step time per plan, as `python -m eval run replay` measures it
    # on the serving machine (defaults: docs/results.md, fp32 on a 2-core CPU).
    graph_ratio: float = key(1.31, _POSITIVE)
    full_ratio: float = key(1.23, _POSITIVE)
    down_ratio: float = key(1.06, _POSITIVE)

    @property
    def ratios(self) -> dict[str, float]:
        return {"graph": self.graph_ratio, "full": self.full_ratio, "down": self.down_ratio}


@dataclass(frozen=True)
class RecordConfig(Section):
    is_enabled: bool = key(True)
    # "auto" (default: core/plan_auto.py), "full" (the four projections), "graph" (full +
    # attention output and lse, core/plan.py Note [Graph plan]), one name or a list of
    # RECORD_TENSORS.
    plan: str | tuple[str, ...] = key("auto", _PLAN)
    # Greedy by bytes/token instead; null: ``plan``.
    budget_bytes_per_token: int | str | None = key(None, _BUDGET)
    auto: AutoPlanConfig = field(default_factory=AutoPlanConfig)

    def problems(self) -> Iterator[tuple[str, str]]:
        if self.budget_bytes_per_token is not None and self.plan not in ("auto", "full"):
            yield "budget_bytes_per_token", "set record.plan or record.budget_bytes_per_token, not both"


@dataclass(frozen=True)
class StoreConfig(Section):
    host_bytes: int = key(2 * 1024**3, _BYTES)
    device_bytes: int = key(0, _BYTES)
    page_tokens: int = key(16, Rule(lambda n: 1 <= n <= 16, "must be between 1 and 16"))
    ttl_s: float = key(3600.0, _POSITIVE)
    # Prefix dedup of recordings (pages shared across requests). false: every request stores its
    # own pages (store/roots.py); meant with sglang.disable-radix-cache, for the dedup experiment.
    dedup: bool = key(True)


@dataclass(frozen=True)
class LoraConfig(Section):
    rank: int = key(16, _COUNT)
    alpha: float = key(32.0)
    dropout: float = key(0.0, within(0, 1, "[)"))
    targets: tuple[str, ...] = key(LORA_TARGETS, Rule(
        lambda ts: all(t in LORA_TARGETS for t in ts), f"must name targets from {list(LORA_TARGETS)}",
        is_value_shown=True))


_ONLINE_EXACT = Rule(lambda mode: mode == "exact", "'response_only' is not yet supported in the "
                     "online loop, whose work units run 'exact' only (ReplayTrainer.step takes it "
                     "outside the loop); set exact")


@dataclass(frozen=True)
class TrainConfig(Section):
    is_enabled: bool = key(True)
    replay: bool = key(True)
    # response_only (train/forward.py, Note [Response-only gradients]) is refused at startup until
    # the online loop's work units run it; the trainer API takes it.
    gradient_mode: Literal["exact", "response_only"] = key("exact", _ONLINE_EXACT)
    max_version_lag: int = key(0, at_least(0))
    # Run the trainer's decoder layers through torch.compile, compiled before serving starts
    # (alchemist_sgl/train/layer.py, Note [Compiled layer]).
    compile: bool = key(False)
    # Work-unit time per scheduler iteration while requests wait or run (adds to their TPOT).
    slice_budget_ms: float = key(30.0, _POSITIVE)
    # Work-unit time per scheduler iteration while nothing is waiting or running.
    idle_slice_ms: float = key(500.0, _POSITIVE)
    lora: LoraConfig = field(default_factory=LoraConfig)
    objective_negative: Literal["unlikelihood", "kto"] = key("unlikelihood")
    learning_rate: float = key(1e-4, _POSITIVE)
    # Rounds (online/loop.py, Note [Rounds]): one optimizer step per served version. A round
    # closes at round_s seconds or round_max_samples samples, whichever first, never empty.
    round_s: float = key(60.0, _POSITIVE)
    round_max_samples: int = key(64, _COUNT)
    # A stale sample pending longer is deferred (feedback) or dropped.
    stale_max_age_s: float = key(600.0, _POSITIVE)
    # Queue bound: POST /alchemist/train/samples answers 429 beyond.
    max_pending_samples: int = key(1024, _COUNT)
    loss_chunk_rows: int = key(256, _COUNT)  # LM head + loss run in chunks of at most this many rows
    checkpoint_dir: str = key("var/checkpoints", Rule(bool, "must name a folder"))
    # A checkpoint after the first round that ends this long after the last.
    checkpoint_every_s: float = key(300.0, at_least(0))
    seed: int = key(0)


@dataclass(frozen=True)
class GateConfig(Section):
    is_enabled: bool = key(False)
    # JSONL of {"prompt": str, "response": str}; None = the packaged held-out set.
    heldout_path: str | None = key(None)
    max_regression: float = key(0.05, at_least(0))       # nats/token worse than the last accepted
    max_regression_total: float = key(0.2, at_least(0))  # nats/token worse than v0
    every: int = key(1, _COUNT)                          # score every N-th publish


@dataclass(frozen=True)
class GuardConfig(Section):
    """The feedback guard (online/guard.py): rolls back a version rated worse than its parent."""
    is_enabled: bool = key(False)
    min_ratings: int = key(20, _COUNT)                    # ratings each side needs first
    max_increase: float = key(0.1, at_least(0))           # down-rate allowed over the parent's
    alpha: float = key(0.05, within(0, 0.5, "(]"))        # the one-sided test's level


_ONE_STEP = Rule(lambda n: n == 1, "must be 1: a round takes one optimizer step and publishes it, "
                 "so that every sample served at a version trains at lag 0 (train.round_s and "
                 "train.round_max_samples set how much a step takes)")


@dataclass(frozen=True)
class PublishConfig(Section):
    # The one publish mode: the served weights are rebuilt from the master copy after each step
    # ('adapter' is refused: REFUSED_VALUES).
    mode: Literal["merge"] = key("merge")
    every_steps: int = key(1, _ONE_STEP)  # one publish per round (Note [Rounds])
    gate: GateConfig = field(default_factory=GateConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    keep_adapters_last: int = key(5, _COUNT)    # adapter folders kept: the last N ...
    keep_adapters_every: int = key(10, _COUNT)  # ... plus every k-th version


@dataclass(frozen=True)
class FeedbackConfig(Section):
    db_path: str = key("var/feedback.sqlite")
    max_body_bytes: int = key(1024 * 1024, at_least(1024))
    api_key: str | None = key(None)
    max_pending: int = key(10_000, _COUNT)
    completion_ttl_s: float = key(24 * 3600.0, _POSITIVE)
    # Per API key (or client host): 429 beyond.
    rate_limit_per_minute: int | None = key(None, or_null(_COUNT, "no limit"))
    poll_every_s: float = key(0.5, _POSITIVE)  # the scheduler's poll of new feedback


_TRANSITIONS = at_least(3, ": a recovery reserves room for the spike entry and the pause that may "
                           "follow it (Note [Arbiter policy] in memory/arbiter.py)")


@dataclass(frozen=True)
class MemoryConfig(Section):
    """The memory arbiter's policy (Note [Arbiter policy] in memory/arbiter.py)."""
    is_enabled: bool = key(True)
    waiting_requests_high: int = key(4, _COUNT)
    kv_usage_high: float = key(0.85, within(0, 1, "(]"))
    train_budget_bytes: int = key(512 * 1024**2, _BYTES)
    # A spike also when the arrival-rate EMA reaches this (null: arrivals never signal a spike).
    arrival_rate_high_per_s: float | None = key(4.0, or_null(_POSITIVE, "arrivals never signal a spike"))
    arrival_ema_tau_s: float = key(5.0, _POSITIVE)  # time constant of that EMA
    # A spike also when recent TTFT exceeds this while requests are in flight (null: ignored).
    ttft_target_ms: float | None = key(2000.0, or_null(_POSITIVE, "TTFT never signals a spike"))
    # Recovery needs every signal below this x its mark ...
    recover_fraction: float = key(0.5, within(0, 1, "(]"))
    min_dwell_s: float = key(2.0, at_least(0))  # ... for this long, and this long in the state
    # In any 60 s window (spike entries included).
    max_transitions_per_minute: int = key(12, _TRANSITIONS)
    pause_after_s: float = key(10.0, _POSITIVE)  # YIELDING -> PAUSED after pressure lasts this long
    # YIELDING keeps this share of train_budget_bytes.
    yield_budget_fraction: float = key(0.25, within(0, 1))
    # Move each forward unit's saved tensors to host after it and back before its backward
    # (alchemist_sgl/train/offload.py, Note [Saved-tensor offload]); off: they stay resident.
    offload: bool = key(False)


@dataclass(frozen=True)
class ServerConfig(Section):
    # A prepared model name (see ``alchemist-sgl prepare``) or a path to a HF model folder.
    model: str = key("smollm2-135m-instruct", Rule(bool, "must name a prepared model or a folder"))
    served_model_name: str = key("smollm2")
    host: str = key("127.0.0.1")
    port: int = key(30000, Rule(lambda p: 1 <= p <= 65535, "must be a TCP port"))
    cache_dir: str = key("var/models")
    # Registers test/debug control commands (e.g. reading recordings back); off in production.
    enable_debug_commands: bool = key(False)


@dataclass(frozen=True)
class Config(Section):
    # Passed verbatim to SGLang's server arguments; integration/ checks its keys against SGLang's parser.
    sglang: Mapping[str, Any] = field(default_factory=lambda: types.MappingProxyType({}))
    record: RecordConfig = field(default_factory=RecordConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    publish: PublishConfig = field(default_factory=PublishConfig)
    feedback: FeedbackConfig = field(default_factory=FeedbackConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    server: ServerConfig = field(default_factory=ServerConfig)

    def problems(self) -> Iterator[tuple[str, str]]:
        # Note [merge needs no dropout]: the trainer's forward W_pub x + s*B(Ax) - s*B_pub(A_pub x)
        # is exact only if both LoRA branches see the same x; dropout on one of them breaks it.
        if self.train.is_enabled and self.train.lora.dropout > 0:
            yield "train.lora.dropout", ("must be 0 with publish.mode 'merge' (the published and "
                                         "trained LoRA branches must see the same input)")


_ROUNDS = ("retired by rounds (one optimizer step per served version): set train.round_s "
           "and train.round_max_samples instead")
# Keys that left the schema: a config naming one is refused with what replaced it.
RETIRED_KEYS = {"train.batch_samples": _ROUNDS, "train.min_pending_samples": _ROUNDS,
                "train.max_wait_s": _ROUNDS, "publish.every_s": _ROUNDS,
                "train.checkpoint_every_steps": "retired by rounds: checkpoints are time-based, set "
                                                "train.checkpoint_every_s instead"}
# Values that left a key's choices: a config naming one is refused with the reason.
REFUSED_VALUES = {"publish.mode": {
    "adapter": "'adapter' is not built: publishing merges each step's LoRA into the served weights, "
               "rebuilt from the master copy ('merge', the only mode: leave publish.mode out or set "
               "it to merge)"}}
