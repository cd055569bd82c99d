"""Prometheus text for ``GET /metrics``: SGLang's own metrics (when ``--enable-metrics``) plus ours.

Owns ``render_alchemist_metrics``: the ``alchemist_*`` families from the scheduler's status dict
(``/alchemist/status``), the feedback table's counts by label and the HTTP side's feedback answers
by code. Pure: plain dicts in, text out (Prometheus exposition format 0.0.4). Imports nothing of
the package but the standard library.

Families (counters end in ``_total``):
  alchemist_feedback_total{label}            feedback rows stored, by label (up/down/score/correction)
  alchemist_feedback_answers_total{code}     answers of the feedback routes, by HTTP status
  alchemist_train_steps_total, alchemist_train_samples_total, alchemist_train_tokens_total
  alchemist_train_loss (last step), alchemist_train_loss_ema, alchemist_train_learning_rate
  alchemist_train_grad_norm (last step, when the trainer reports it)
  alchemist_train_tokens_per_second (tokens of the last step / its busy time)
  alchemist_train_replayed_tokens_total, alchemist_train_recomputed_tokens_total,
  alchemist_train_stale_recomputes_total, alchemist_train_nonfinite_skipped_total
  alchemist_train_queue_depth, alchemist_train_paused, alchemist_train_units_over_budget_total
  alchemist_train_samples_by_fate{fate}      samples that ended trained, deferred (now), dropped,
                                             expired (online/accounting.py, Note [Sample fates])
  alchemist_train_samples_fed_total, alchemist_train_samples_in_round
  alchemist_train_samples_by_lag{lag}        trained samples by version lag
  alchemist_store_bytes, alchemist_store_pages
  alchemist_versions_published_total, alchemist_versions_rejected_total,
  alchemist_guard_rollbacks_total            versions the feedback guard rolled back
  alchemist_publish_stall_ms (last), alchemist_publish_ms (last)
  alchemist_serving_version{version} 1
  alchemist_arbiter_state{state}, alchemist_arbiter_transitions_total,
  alchemist_arbiter_train_budget_bytes, alchemist_arbiter_recent_ttft_ms (when known)
  alchemist_memory_bytes{part}               the ``memory`` status block's bytes: weights, master,
                                             adapter, gradients, optimizer, published_adapter,
                                             saved_device, saved_host (memory.offload), kv_pool
  alchemist_memory_peak_bytes{pool}          saved tensors' peak per pool (device, host)
  alchemist_memory_moved_bytes_total{direction}  saved-tensor bytes moved (to_host, to_device)
  alchemist_memory_yields_total, alchemist_memory_yield_moved_bytes_total
  alchemist_memory_kv_tokens{kind}           KV pool tokens: used, free, evictable
"""

from __future__ import annotations

import math
from typing import Any, Iterable

_HELP = {
    "alchemist_feedback_total": ("counter", "feedback rows stored, by label"),
    "alchemist_feedback_answers_total": ("counter", "answers of the feedback routes, by HTTP status"),
    "alchemist_train_steps_total": ("counter", "optimizer steps taken"),
    "alchemist_train_samples_total": ("counter", "samples trained"),
    "alchemist_train_tokens_total": ("counter", "prompt + response tokens trained"),
    "alchemist_train_loss": ("gauge", "loss of the last step"),
    "alchemist_train_loss_ema": ("gauge", "exponential moving average of the step loss"),
    "alchemist_train_learning_rate": ("gauge", "AdamW learning rate"),
    "alchemist_train_grad_norm": ("gauge", "gradient norm of the last step"),
    "alchemist_train_tokens_per_second": ("gauge", "tokens of the last step per second of its busy time"),
    "alchemist_train_replayed_tokens_total": ("counter", "prompt tokens replayed from recordings"),
    "alchemist_train_recomputed_tokens_total": ("counter", "prompt tokens recomputed"),
    "alchemist_train_stale_recomputes_total": ("counter", "recorded segments refused as stale"),
    "alchemist_train_nonfinite_skipped_total": ("counter", "steps skipped for non-finite values"),
    "alchemist_train_units_over_budget_total": ("counter", "work units longer than their slice budget"),
    "alchemist_train_queue_depth": ("gauge", "samples pending for training"),
    "alchemist_train_paused": ("gauge", "1 while training is paused by the admin route"),
    "alchemist_train_samples_by_fate": ("gauge", "samples by fate: trained, deferred, dropped, expired"),
    "alchemist_train_samples_fed_total": ("counter", "samples fed to training (each once)"),
    "alchemist_train_samples_in_round": ("gauge", "samples in the open round (not stepped yet)"),
    "alchemist_train_samples_by_lag": ("gauge", "trained samples by version lag"),
    "alchemist_store_bytes": ("gauge", "bytes of recorded activations stored"),
    "alchemist_store_pages": ("gauge", "pages in the activation store"),
    "alchemist_versions_published_total": ("counter", "versions published"),
    "alchemist_versions_rejected_total": ("counter", "candidate versions rejected by the gate"),
    "alchemist_guard_rollbacks_total": ("counter", "versions the feedback guard rolled back"),
    "alchemist_publish_ms": ("gauge", "build + copy time of the last publish (ms)"),
    "alchemist_publish_stall_ms": ("gauge", "serving stall of the last publish: the copy (ms)"),
    "alchemist_serving_version": ("gauge", "1 for the version serving now"),
    "alchemist_arbiter_state": ("gauge", "1 for the memory arbiter's current state"),
    "alchemist_arbiter_transitions_total": ("counter", "memory arbiter state transitions"),
    "alchemist_arbiter_train_budget_bytes": ("gauge", "training memory budget set by the arbiter"),
    "alchemist_arbiter_recent_ttft_ms": ("gauge", "median recent scheduler TTFT the arbiter saw (ms)"),
    "alchemist_memory_bytes": ("gauge", "bytes held, by part (read from the live tensors and pools)"),
    "alchemist_memory_peak_bytes": ("gauge", "peak bytes of training's saved tensors, by pool"),
    "alchemist_memory_moved_bytes_total": ("counter", "saved-tensor bytes moved between pools"),
    "alchemist_memory_yields_total": ("counter", "yields that moved a step's saved tensors to host"),
    "alchemist_memory_yield_moved_bytes_total": ("counter", "saved-tensor bytes moved by yields"),
    "alchemist_memory_kv_tokens": ("gauge", "KV pool tokens, by kind (used, free, evictable)"),
}

_MEMORY_PARTS = (("weights", "weights_bytes"), ("master", "master_bytes"),
                 ("adapter", "adapter_bytes"), ("gradients", "gradient_bytes"),
                 ("optimizer", "optimizer_bytes"), ("published_adapter", "published_adapter_bytes"))


def _fmt(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


def _label_value(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _samples(status: dict[str, Any] | None, labels: dict[str, int],
             answers: dict[int, int]) -> Iterable[tuple[str, dict[str, str], float]]:
    for label, n in sorted(labels.items()):
        yield "alchemist_feedback_total", {"label": label}, n
    for code, n in sorted(answers.items()):
        yield "alchemist_feedback_answers_total", {"code": str(code)}, n
    if not status:
        return
    train, store, publish = status.get("train") or {}, status.get("store") or {}, status.get("publish") or {}

    def num(block: dict[str, Any], key: str) -> float | None:
        value = block.get(key)
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    plain = [("alchemist_train_steps_total", train, "steps"),
             ("alchemist_train_samples_total", train, "samples_trained"),
             ("alchemist_train_tokens_total", train, "tokens_trained"),
             ("alchemist_train_loss", train, "last_loss"),
             ("alchemist_train_loss_ema", train, "loss_ema"),
             ("alchemist_train_learning_rate", train, "learning_rate"),
             ("alchemist_train_grad_norm", train, "last_grad_norm"),
             ("alchemist_train_replayed_tokens_total", train, "replayed_tokens"),
             ("alchemist_train_recomputed_tokens_total", train, "recomputed_tokens"),
             ("alchemist_train_stale_recomputes_total", train, "stale_recomputes"),
             ("alchemist_train_nonfinite_skipped_total", train, "nonfinite_skipped"),
             ("alchemist_train_units_over_budget_total", train, "units_over_budget"),
             ("alchemist_train_queue_depth", train, "samples_pending"),
             ("alchemist_store_bytes", store, "bytes_stored"),
             ("alchemist_store_pages", store, "pages"),
             ("alchemist_versions_published_total", publish, "publishes"),
             ("alchemist_versions_rejected_total", publish, "rejected"),
             ("alchemist_guard_rollbacks_total", publish, "guarded"),
             ("alchemist_publish_ms", publish, "last_publish_ms"),
             ("alchemist_publish_stall_ms", publish, "last_stall_ms")]
    for name, block, key in plain:
        value = num(block, key)
        if value is not None:
            yield name, {}, value
    if "paused" in train:
        yield "alchemist_train_paused", {}, 1.0 if train["paused"] else 0.0
    yield from _round_samples(train, num)
    tokens, ms = num(train, "last_step_tokens"), num(train, "last_step_ms")
    if tokens is not None and ms:
        yield "alchemist_train_tokens_per_second", {}, tokens / (ms / 1000.0)
    if status.get("weight_version"):
        yield "alchemist_serving_version", {"version": str(status["weight_version"])}, 1.0
    arbiter = status.get("arbiter") or {}
    if arbiter.get("state"):
        for state in ("TRAINING", "YIELDING", "PAUSED"):
            yield "alchemist_arbiter_state", {"state": state}, 1.0 if arbiter["state"] == state else 0.0
        for name, key in (("alchemist_arbiter_transitions_total", "transitions"),
                          ("alchemist_arbiter_train_budget_bytes", "train_budget_bytes")):
            value = num(arbiter, key)
            if value is not None:
                yield name, {}, value
        ttft = num(arbiter, "recent_ttft_ms")
        if ttft is not None:
            yield "alchemist_arbiter_recent_ttft_ms", {}, ttft
    yield from _memory_samples(status.get("memory") or {}, num)


def _round_samples(train: dict[str, Any], num: Any) -> Iterable[tuple[str, dict[str, str], float]]:
    """The rounds keys of the ``train`` status block (online/loop_status.py), the same numbers."""
    for fate, value in (train.get("samples_by_fate") or {}).items():
        yield "alchemist_train_samples_by_fate", {"fate": str(fate)}, float(value)
    for lag, value in (train.get("samples_trained_by_lag") or {}).items():
        yield "alchemist_train_samples_by_lag", {"lag": str(lag)}, float(value)
    for name, key in (("alchemist_train_samples_fed_total", "samples_fed"),
                      ("alchemist_train_samples_in_round", "samples_in_round")):
        value = num(train, key)
        if value is not None:
            yield name, {}, value


def _memory_samples(memory: dict[str, Any], num: Any) -> Iterable[tuple[str, dict[str, str], float]]:
    """The ``memory`` status block (online/memory_status.py) as gauges, the same numbers."""
    saved, kv = memory.get("saved_tensors") or {}, memory.get("kv") or {}
    parts = [(part, memory, key) for part, key in _MEMORY_PARTS]
    parts += [("saved_device", saved, "device_resident_bytes"),
              ("saved_host", saved, "host_resident_bytes"), ("kv_pool", kv, "pool_bytes")]
    for part, block, key in parts:
        value = num(block, key)
        if value is not None:
            yield "alchemist_memory_bytes", {"part": part}, value
    for name, labels, key in (
            ("alchemist_memory_peak_bytes", {"pool": "device"}, "device_peak_bytes"),
            ("alchemist_memory_peak_bytes", {"pool": "host"}, "host_peak_bytes"),
            ("alchemist_memory_moved_bytes_total", {"direction": "to_host"}, "moved_to_host_bytes"),
            ("alchemist_memory_moved_bytes_total", {"direction": "to_device"}, "moved_to_device_bytes"),
            ("alchemist_memory_yields_total", {}, "yields"),
            ("alchemist_memory_yield_moved_bytes_total", {}, "yield_moved_bytes")):
        value = num(saved, key)
        if value is not None:
            yield name, labels, value
    for kind in ("used", "free", "evictable"):
        value = num(kv, f"{kind}_tokens")
        if value is not None:
            yield "alchemist_memory_kv_tokens", {"kind": kind}, value


def render_alchemist_metrics(status: dict[str, Any] | None, feedback_by_label: dict[str, int],
                             answers_by_code: dict[int, int]) -> str:
    """The ``alchemist_*`` families as Prometheus text (HELP/TYPE once per family)."""
    lines: list[str] = []
    seen: set[str] = set()
    for name, labels, value in _samples(status, feedback_by_label, answers_by_code):
        if name not in seen:
            seen.add(name)
            kind, text = _HELP[name]
            lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
        label_text = ",".join(f'{k}="{_label_value(v)}"' for k, v in labels.items())
        lines.append(f"{name}{{{label_text}}} {_fmt(value)}" if label_text else f"{name} {_fmt(value)}")
    return "\n".join(lines) + "\n"
