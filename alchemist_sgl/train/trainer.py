"""The trainer the runtime calls: one AdamW step over the LoRA adapter from a batch of samples.

Owns ``ReplayTrainer`` (adapter, optimizer, RoPE cache, version counter, cumulative counters),
``StepStats`` and ``TrainCounters`` (the ``train`` block of ``/alchemist/status``). Imports only
torch; the config is duck-typed (``alchemist_sgl.config.TrainConfig`` or anything with the same
attributes), so this package runs where only torch is installed.

Contract: ``step`` must run with no concurrent writer of the base tensors (it reads them); it enables
grad itself (SGLang's loop runs under no_grad) and must not run under ``torch.inference_mode``.
Each sample's graph is built, back-propagated and freed before the next (gradient accumulation),
so peak memory is one sample's. The loss is the mean over samples of ``weight * loss_s`` divided by
the mean weight (objectives.py). ``version`` advances by one per optimizer step
(samples.py, Note [Staleness]); ``merge_into_base`` folds the adapter into the base tensors and
restarts a fresh adapter and optimizer state.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from alchemist_sgl.train.forward import forward_logprobs
from alchemist_sgl.train.joint import joint_forward_logprobs
from alchemist_sgl.train.lora import LoraAdapter, merge_adapter_into_base
from alchemist_sgl.train.objectives import sample_loss
from alchemist_sgl.train.ops import RopeCache
from alchemist_sgl.train.samples import PlanCounts, PlannedSample, Sample, plan_sample
from alchemist_sgl.train.weights import BaseWeights


@dataclass
class StepStats:
    loss: float
    samples: int
    tokens: int                # prompt + response tokens trained
    replayed_tokens: int
    recomputed_tokens: int
    stale_recomputes: int
    reuse_by_lag: dict[int, int]
    step_ms: float             # busy time: forward/backward slices + optimizer, not the gaps
    max_slice_ms: float        # the longest single-sample slice (compare train.slice_budget_ms)
    version: int               # the trainer version after this step


@dataclass
class TrainCounters:
    """Cumulative numbers for the ``train`` status block (INTERFACES.md)."""

    steps: int = 0
    samples_trained: int = 0
    tokens_trained: int = 0
    replayed_tokens: int = 0
    recomputed_tokens: int = 0
    stale_recomputes: int = 0
    loss_ema: float | None = None
    reuse_by_lag: dict[int, int] = field(default_factory=dict)

    def add(self, s: StepStats) -> None:
        self.steps += 1
        self.samples_trained += s.samples
        self.tokens_trained += s.tokens
        self.replayed_tokens += s.replayed_tokens
        self.recomputed_tokens += s.recomputed_tokens
        self.stale_recomputes += s.stale_recomputes
        self.loss_ema = s.loss if self.loss_ema is None else 0.9 * self.loss_ema + 0.1 * s.loss
        for lag, n in s.reuse_by_lag.items():
            self.reuse_by_lag[lag] = self.reuse_by_lag.get(lag, 0) + n


class ReplayTrainer:
    """LoRA training over frozen ``BaseWeights`` with replay of recorded base projections.

    ``config``: a ``TrainConfig`` (replay, gradient_mode, max_version_lag, lora.{rank, alpha,
    dropout, targets}, objective_negative, learning_rate). ``version``: the trainer version the
    serving weights correspond to at construction (normally 0). ``layout``: ``"segments"``
    (default; forward.py, Note [Segments]) or ``"joint"`` (joint.py, Note [Joint layout]); same
    gradients, different speed trade-offs. ``adapter_dtype``: the LoRA parameters' (and AdamW
    state's) dtype, fp32 by default whatever the base dtype: bf16 parameters would round away
    most AdamW updates (|A| ~ 0.04 has a bf16 spacing of ~1.6e-4 > lr). The forward casts them
    to the activation dtype.
    """

    def __init__(self, weights: BaseWeights, config: Any, *, version: int = 0, seed: int = 0,
                 layout: str = "segments", adapter_dtype: torch.dtype = torch.float32) -> None:
        if layout not in ("segments", "joint"):
            raise ValueError(f"unknown layout {layout!r} (segments | joint)")
        self.weights, self.config, self.version, self.layout = weights, config, version, layout
        lc = config.lora
        self.adapter = LoraAdapter(weights.spec, lc.rank, lc.alpha, lc.dropout, lc.targets,
                                   dtype=adapter_dtype, device=weights.device, seed=seed)
        self.optimizer = torch.optim.AdamW(self.adapter.parameters(), lr=config.learning_rate,
                                           weight_decay=0.0)
        self.rope = RopeCache(weights.spec.head_dim, weights.spec.rope_theta, weights.dtype,
                              weights.device)
        self.counters = TrainCounters()
        self._kl_ema = 0.0

    def plan(self, sample: Sample) -> PlannedSample:
        return plan_sample(sample, self.weights.spec, version=self.version,
                           max_version_lag=self.config.max_version_lag,
                           is_replay_enabled=self.config.replay, dtype=self.weights.dtype,
                           is_response_separate=self.config.gradient_mode == "response_only")

    def logprobs(self, planned: PlannedSample, *, is_adapter_enabled: bool = True) -> torch.Tensor:
        """Response log-probs [R]; with grad when grad is enabled and the adapter is on.
        ``layout="joint"`` (exact mode only) uses joint.py, Note [Joint layout]."""
        adapter = self.adapter if is_adapter_enabled else None
        if self.layout == "joint" and self.config.gradient_mode == "exact":
            return joint_forward_logprobs(self.weights, adapter, self.rope, planned,
                                          is_training=self.adapter.training)
        return forward_logprobs(self.weights, self.adapter if is_adapter_enabled else None,
                                self.rope, planned, gradient_mode=self.config.gradient_mode,
                                is_training=self.adapter.training)

    def begin_step(self, samples: Sequence[Sample]) -> "StepInProgress":
        """Plans ``samples`` (raises ValueError on a malformed one, before any work) and returns a
        step the caller advances one sample at a time (``run_next``), e.g. one per scheduler
        iteration under ``train.slice_budget_ms``, then ``finish``es. Gradients accumulate in the
        adapter between calls: no other step may run meanwhile, and the base must not change."""
        if not samples:
            raise ValueError("a step needs at least one sample")
        self.adapter.train()
        self.optimizer.zero_grad(set_to_none=True)
        return StepInProgress(self, [self.plan(s) for s in samples])

    def accumulate(self, samples: Sequence[Sample]) -> tuple[float, PlanCounts, int]:
        """Forward + backward of every sample into the adapter's ``.grad`` (not zeroed first); no
        optimizer step. Returns (loss, counts, tokens). For equivalence tests and benchmarks."""
        if not samples:
            raise ValueError("a step needs at least one sample")
        sip = StepInProgress(self, [self.plan(s) for s in samples])
        while not sip.is_done:
            sip.run_next()
        sip.update_kl_estimate()
        return sip.loss, sip.counts, sip.tokens

    def step(self, samples: Sequence[Sample]) -> StepStats:
        """One AdamW step over the adapter from ``samples``; advances ``version``; returns stats."""
        sip = self.begin_step(samples)
        while not sip.is_done:
            sip.run_next()
        return sip.finish()

    def _sample_loss(self, planned: PlannedSample) -> tuple[torch.Tensor, float | None]:
        """(loss of one sample, its summed log-ratio to the reference or None)."""
        s = planned.sample
        ref = None
        if s.kind == "negative" and self.config.objective_negative == "kto":
            ref = s.ref_logprobs
            if ref is None:  # objectives.py, Note [Reference log-probs], option (2)
                with torch.no_grad():
                    ref = self.logprobs(planned, is_adapter_enabled=False)
        logp = self.logprobs(planned)
        loss = sample_loss(s.kind, self.config.objective_negative, logp, ref, self._kl_ema)
        ratio = None if ref is None else float((logp.detach() - ref.to(logp)).sum())  # host sync
        return loss, ratio

    def state_dict(self) -> dict[str, Any]:
        """Everything that outlives a step (adapter, AdamW state, version, counters, KL estimate),
        for checkpoints. Tensors are references: copy them before mutating the trainer."""
        return {"adapter": self.adapter.state_dict(), "optimizer": self.optimizer.state_dict(),
                "version": self.version, "counters": dataclasses.asdict(self.counters),
                "kl_ema": self._kl_ema}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.adapter.load_state_dict(state["adapter"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.version = int(state["version"])
        counters = dict(state["counters"])
        counters["reuse_by_lag"] = {int(k): v for k, v in counters["reuse_by_lag"].items()}
        self.counters = TrainCounters(**counters)
        self._kl_ema = float(state["kl_ema"])

    def merge_into_base(self, seed: int = 0) -> None:
        """Folds the adapter into the base tensors (in place; quiescence required: no forward may
        read them meanwhile), then restarts a fresh adapter and clears AdamW's state. The version
        does not change: base + fresh adapter computes what base + adapter computed."""
        merge_adapter_into_base(self.weights, self.adapter)
        self.adapter.reset(seed=seed)
        self.optimizer.state.clear()

    def status(self) -> dict[str, Any]:
        """The trainer's part of the ``train`` status block (INTERFACES.md)."""
        c = self.counters
        return {"steps": c.steps, "samples_trained": c.samples_trained,
                "tokens_trained": c.tokens_trained, "replayed_tokens": c.replayed_tokens,
                "recomputed_tokens": c.recomputed_tokens, "stale_recomputes": c.stale_recomputes,
                "loss_ema": c.loss_ema, "reuse_by_lag": dict(c.reuse_by_lag),
                "version": self.version}


class StepInProgress:
    """One optimizer step being built sample by sample (``ReplayTrainer.begin_step``).

    Each ``run_next`` builds, back-propagates and frees one sample's graph; the loss of sample s
    is scaled by weight_s / mean weight / number of samples, so the finished gradient is the
    gradient of the weighted mean loss whatever the slicing.
    """

    def __init__(self, trainer: ReplayTrainer, plans: list[PlannedSample]) -> None:
        self.trainer, self.plans = trainer, plans
        self.mean_weight = sum(p.sample.weight for p in plans) / len(plans)
        self.next_index, self.loss, self.tokens = 0, 0.0, 0
        self.counts = PlanCounts()
        self.ratios: list[float] = []
        self.busy_s, self.max_slice_s = 0.0, 0.0  # time inside run_next/finish, not between

    @property
    def is_done(self) -> bool:
        return self.next_index >= len(self.plans)

    def run_next(self) -> None:
        """Forward + backward of the next sample (adds into the adapter's ``.grad``)."""
        t0 = time.perf_counter()
        planned = self.plans[self.next_index]
        self.next_index += 1
        with torch.enable_grad():
            loss, ratio = self.trainer._sample_loss(planned)
            loss = loss * (planned.sample.weight / self.mean_weight / len(self.plans))
            loss.backward()
        self.loss += float(loss.detach())  # host sync: once per sample, for stats
        if ratio is not None:
            self.ratios.append(ratio)
        self.counts.add(planned.counts)
        self.tokens += planned.input_ids.numel()
        dt = time.perf_counter() - t0
        self.busy_s += dt
        self.max_slice_s = max(self.max_slice_s, dt)

    def update_kl_estimate(self) -> None:
        if self.ratios:
            t = self.trainer
            t._kl_ema = 0.9 * t._kl_ema + 0.1 * max(0.0, sum(self.ratios) / len(self.ratios))

    def finish(self) -> StepStats:
        """AdamW step, version + 1, counters updated. All samples must have run."""
        if not self.is_done:
            raise RuntimeError(f"{len(self.plans) - self.next_index} samples of this step have not run")
        t, t0 = self.trainer, time.perf_counter()
        self.update_kl_estimate()
        t.optimizer.step()
        t.optimizer.zero_grad(set_to_none=True)
        t.version += 1
        c = self.counts
        stats = StepStats(loss=self.loss, samples=len(self.plans), tokens=self.tokens,
                          replayed_tokens=c.replayed_tokens, recomputed_tokens=c.recomputed_tokens,
                          stale_recomputes=c.stale_recomputes, reuse_by_lag=dict(c.reuse_by_lag),
                          step_ms=(self.busy_s + time.perf_counter() - t0) * 1000.0,
                          max_slice_ms=self.max_slice_s * 1000.0, version=t.version)
        t.counters.add(stats)
        return stats
