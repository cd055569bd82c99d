"""The trainer the runtime calls: one AdamW step over the LoRA adapter from a batch of samples.

Owns ``ReplayTrainer`` (adapter, optimizer, the published snapshot, RoPE cache, version, cumulative
counters; ``StepStats`` and ``TrainCounters`` live in stats.py).
Imports only torch and train/ modules; the config is a ``TrainSettings`` (context.py: the
attributes of ``alchemist_sgl.config.TrainConfig`` it reads).

Contract: a step must run with no concurrent writer of the base tensors (it reads them, and in
merge mode they are the live served weights W_pub; forward.py, Note [Published adapter]); it
enables grad itself (SGLang's loop runs under no_grad) and must not run under
``torch.inference_mode``. ``begin_step`` runs a step as work units (units.py, Note [Work units]);
each sample's graph is built, back-propagated and freed before the next, so peak memory is one
sample's. The loss is sum over samples of ``weight * loss_s`` divided by the sum of the weights,
applied after the backward (rounds.py, Note [Round normalisation]; objectives.py). ``version`` is a
plain attribute the caller (the online loop) sets before a step: recordings are planned with lag = version - recording.version (samples.py, Note [Staleness]).
The adapter and AdamW state carry on across publishes; ``set_published`` swaps the subtracted snapshot.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Literal, Mapping, Sequence

import torch

from alchemist_sgl.train.context import LayerContext, Layout, TrainSettings
from alchemist_sgl.train.forward import forward_logprobs
from alchemist_sgl.train.joint import joint_forward_logprobs
from alchemist_sgl.train.lora import FrozenLora, LoraAdapter
from alchemist_sgl.train.objectives import sample_loss
from alchemist_sgl.train.ops import RopeCache
from alchemist_sgl.train.rounds import RoundRun
from alchemist_sgl.train.samples import PlanCounts, PlannedSample, Sample, plan_sample
from alchemist_sgl.train.offload import SavedTensorOffload
from alchemist_sgl.train.optimizer_unit import is_step_finite
from alchemist_sgl.train.stats import StepStats as StepStats  # re-export
from alchemist_sgl.train.stats import TrainCounters as TrainCounters  # re-export
from alchemist_sgl.train.units import ScoreRun, StepRun, check_unit_support
from alchemist_sgl.train.weights import BaseWeights


class ReplayTrainer:
    """LoRA training over frozen ``BaseWeights`` with replay of recorded base projections.

    ``config``: a ``TrainConfig`` (replay, gradient_mode, max_version_lag, loss_chunk_rows,
    lora.{rank, alpha, dropout, targets}, objective_negative, learning_rate). ``version``: the
    version the base tensors serve (the caller updates it). ``published``: the adapter merged into
    the base tensors (None: they are the plain W0); see ``set_published`` and forward.py, Note
    [Published adapter]. ``layout``: ``"joint"`` (default; layer.py) or ``"segments"`` (forward.py;
    response-only needs it). ``config.compile``: layer.py, Note [Compiled layer].
    ``adapter_dtype``: the LoRA parameters' (and AdamW state's) dtype, fp32 by default: bf16 would
    round away most AdamW updates (|A| ~ 0.04 has a bf16 spacing of ~1.6e-4 > lr).
    """

    def __init__(self, weights: BaseWeights, config: TrainSettings, *, version: int = 0,
                 seed: int = 0, layout: Layout = "joint",
                 adapter_dtype: torch.dtype = torch.float32,
                 residency: SavedTensorOffload | None = None) -> None:
        if layout not in ("segments", "joint"):
            raise ValueError(f"unknown layout {layout!r} (segments | joint)")
        self.weights, self.config, self.version = weights, config, version
        self.layout: Layout = layout
        self.is_compiled = bool(getattr(config, "compile", False))
        # Set by the warm-up (warmup.py; an "error" string when it failed), shown in status.
        self.compile_info: Mapping[str, float | str] | None = None
        # memory.offload's saved-tensor offload (offload.py), run by the work units; None: no hooks.
        self.residency = residency
        self.seed, self.loss_chunk_rows = seed, int(getattr(config, "loss_chunk_rows", 256))
        lc = config.lora
        self.adapter = LoraAdapter(weights.spec, lc.rank, lc.alpha, lc.dropout, lc.targets,
                                   dtype=adapter_dtype, device=weights.device, seed=seed)
        self.optimizer = torch.optim.AdamW(self.adapter.parameters(), lr=config.learning_rate,
                                           weight_decay=0.0)
        self.rope = RopeCache(weights.spec.head_dim, weights.spec.rope_theta, weights.dtype,
                              weights.device)
        self.counters = TrainCounters()
        self.published: FrozenLora | None = None
        self._is_published_current = False
        self._kl_ema = 0.0
        self._last_ratios: list[float] = []

    @property
    def kl_ema(self) -> float:
        """The KTO KL estimate (``update_kl``)."""
        return self._kl_ema

    def layer_context(self) -> LayerContext:
        """What a decoder layer reads now (context.py; the published adapter as it is now)."""
        return LayerContext(self.weights, self.layout, self.rope, self.published,
                            self.is_published_current, self.is_compiled)

    @property
    def is_published_current(self) -> bool:
        """True while the adapter equals ``published`` bitwise (the lag-0 form runs)."""
        return self._is_published_current and self.published is not None

    def set_published(self, frozen: FrozenLora | None, *, allow_lag0_form: bool = True) -> None:
        """Declares that the base tensors now hold cast(W0 + s*B@A) of ``frozen`` (None: W0), at the
        quiescent point where they change. Chooses the lag-0 form by comparing ``frozen`` with the
        adapter (host sync; ``allow_lag0_form=False`` forces the full form, for tests). ValueError
        with LoRA dropout > 0 or another rank/targets. The adapter and AdamW are untouched."""
        if frozen is not None:
            if self.adapter.dropout > 0.0 or (frozen.rank, frozen.targets) != (
                    self.adapter.rank, self.adapter.targets):
                raise ValueError("a published adapter needs train.lora.dropout: 0 and the trained "
                                 "adapter's rank and targets (forward.py, Note [Published adapter])")
            frozen = frozen.to(self.weights.device)
        self.published = frozen
        self._is_published_current = bool(frozen is not None and allow_lag0_form
                                          and frozen.equals(self.adapter))

    def plan(self, sample: Sample, *, is_replay_enabled: bool | None = None) -> PlannedSample:
        """``sample`` planned (samples.py); its graph recording is used only with exact gradients
        and no LoRA dropout (graph_layer.py, Note [Graph replay])."""
        replay = self.config.replay if is_replay_enabled is None else is_replay_enabled
        is_exact = self.config.gradient_mode == "exact"
        return plan_sample(sample, self.weights.spec, version=self.version,
                           max_version_lag=self.config.max_version_lag,
                           is_replay_enabled=replay, dtype=self.weights.dtype,
                           is_response_separate=not is_exact,
                           is_graph_enabled=is_exact and self.adapter.dropout == 0.0)

    def logprobs(self, planned: PlannedSample, *, is_adapter_enabled: bool = True) -> torch.Tensor:
        """Response log-probs [R] of W0 + adapter (or, with the adapter disabled, of the base
        tensors as they are); with grad when grad is enabled and the adapter is on. Whole sample;
        ``layout="joint"`` (exact mode only) uses joint.py, Note [Joint layout]."""
        adapter = self.adapter if is_adapter_enabled else None
        is_training, current = self.adapter.training, self.is_published_current
        if self.layout == "joint" and self.config.gradient_mode == "exact":
            return joint_forward_logprobs(self.weights, adapter, self.rope, planned,
                                          is_compiled=self.is_compiled, is_training=is_training,
                                          published=self.published, is_published_current=current)
        return forward_logprobs(self.weights, adapter, self.rope, planned,
                                gradient_mode=self.config.gradient_mode, is_training=is_training,
                                published=self.published, is_published_current=current)

    def begin_step(self, samples: Sequence[Sample]) -> StepRun:
        """Plans ``samples`` (raises ValueError on a malformed one, before any work) and returns
        the step as work units (units.py, Note [Work units]). Gradients accumulate in the adapter
        between units: no other step may run meanwhile, and the base must not change. Raises
        ValueError for ``gradient_mode="response_only"`` (use ``step``)."""
        check_unit_support(self.config, self.layout)
        if not samples:
            raise ValueError("a step needs at least one sample")
        plans = [self.plan(s) for s in samples]
        self.adapter.train()
        self.optimizer.zero_grad(set_to_none=True)
        return StepRun(self, plans)

    def begin_round(self, *, is_replay_enabled: bool | None = None) -> RoundRun:
        """An open step that samples join one at a time (rounds.py); replay override per round."""
        return RoundRun(self, is_replay_enabled=is_replay_enabled)

    def begin_scoring(self, pairs: Sequence[Sample],
                      which: Literal["trained", "published"]) -> ScoreRun:
        """No-grad scoring of ``pairs`` (prompt_ids, response_ids; recordings ignored) in units:
        ``"published"`` the base tensors as they are, ``"trained"`` W0 + the current adapter.
        ``ScoreRun.result()``: mean NLL per response token. The weights must not change meanwhile."""
        if not pairs:
            raise ValueError("scoring needs at least one pair")
        return ScoreRun(self, [self.plan(p, is_replay_enabled=False) for p in pairs], which)

    def accumulate(self, samples: Sequence[Sample]) -> tuple[float, PlanCounts, int]:
        """Whole-sample forward + backward of every sample into the adapter's ``.grad`` (not zeroed
        first), any layout and mode; no optimizer step. Returns (loss, counts, tokens)."""
        if not samples:
            raise ValueError("a step needs at least one sample")
        plans = [self.plan(s) for s in samples]
        grad_scale = 1.0 / sum(p.sample.weight for p in plans)
        params = list(self.adapter.parameters())
        prior = [p.grad for p in params]  # kept aside: only this call's sum is normalised
        self.adapter.zero_grad(set_to_none=True)
        loss_sum, counts, tokens, ratios = 0.0, PlanCounts(), 0, []
        with torch.enable_grad():
            for planned in plans:
                loss, ratio = self._sample_loss(planned)
                loss = loss * planned.sample.weight  # rounds.py, Note [Round normalisation]
                loss.backward()  # type: ignore[no-untyped-call]  # torch: Tensor.backward is unannotated
                loss_sum += float(loss.detach()) * grad_scale  # host sync: once per sample
                ratios += [] if ratio is None else [ratio]
                counts.add(planned.counts)
                tokens += planned.input_ids.numel()
        for p, before in zip(params, prior):
            p.grad = before if p.grad is None else (
                p.grad.mul_(grad_scale) if before is None else p.grad.mul_(grad_scale).add_(before))
        self._last_ratios = ratios
        return loss_sum, counts, tokens

    def step(self, samples: Sequence[Sample]) -> StepStats:
        """One AdamW step over the adapter from ``samples``: all work units at once (segments,
        exact), else whole-sample forward + backward and the same finite check."""
        try:
            check_unit_support(self.config, self.layout)
        except ValueError:
            return self._whole_step(samples)
        run = self.begin_step(samples)
        while not run.is_done:
            run.run_unit()
        return run.finish()

    def _whole_step(self, samples: Sequence[Sample]) -> StepStats:
        t0 = time.perf_counter()
        self.adapter.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss, counts, tokens = self.accumulate(samples)
        grads = [p.grad for p in self.adapter.parameters() if p.grad is not None]
        is_finite = is_step_finite(loss, grads)
        if is_finite:
            self.optimizer.step()
            self.on_optimizer_step(self._last_ratios)
        self.optimizer.zero_grad(set_to_none=True)
        ms = (time.perf_counter() - t0) * 1000.0
        return self.record_step(loss, len(samples), tokens, counts, ms, ms, len(samples) + 1,
                                not is_finite)

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

    def on_optimizer_step(self, ratios: list[float]) -> None:
        """After an optimizer step: the adapter left the published one; the KL estimate moves."""
        self._is_published_current = False
        self.update_kl(ratios)

    def update_kl(self, ratios: list[float]) -> None:
        """The KTO KL estimate: an EMA of the batch mean summed log ratio, clamped at 0."""
        if ratios:
            self._kl_ema = 0.9 * self._kl_ema + 0.1 * max(0.0, sum(ratios) / len(ratios))

    def record_step(self, loss: float, samples: int, tokens: int, c: PlanCounts, step_ms: float,
                    max_unit_ms: float, units: int, is_skipped: bool) -> StepStats:
        """Stats of a finished step (``StepRun.finish`` too); counters updated."""
        stats = StepStats(loss=loss, samples=samples, tokens=tokens,
                          replayed_tokens=c.replayed_tokens, recomputed_tokens=c.recomputed_tokens,
                          stale_recomputes=c.stale_recomputes, reuse_by_lag=dict(c.reuse_by_lag),
                          step_ms=step_ms, max_unit_ms=max_unit_ms, version=self.version,
                          units=units, is_nonfinite_skipped=is_skipped,
                          graph_samples=c.graph_samples)
        self.counters.add(stats)
        return stats

    def state_dict(self) -> dict[str, Any]:
        """Everything that outlives a step (adapter, AdamW state, published snapshot, version,
        counters, KL estimate). Tensors are references: copy them before mutating the trainer."""
        pub = None if self.published is None else self.published.state()
        return {"adapter": self.adapter.state_dict(), "optimizer": self.optimizer.state_dict(),
                "version": self.version, "counters": dataclasses.asdict(self.counters),
                "kl_ema": self._kl_ema, "published": pub,
                "is_published_current": self.is_published_current}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores ``state_dict()``'s contents in place (parameters keep their identity)."""
        self.adapter.load_state_dict(state["adapter"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.version = int(state["version"])
        counters = dict(state["counters"])
        counters["reuse_by_lag"] = {int(k): v for k, v in counters["reuse_by_lag"].items()}
        self.counters = TrainCounters(**counters)
        self._kl_ema = float(state["kl_ema"])
        pub = state.get("published")
        self.published = None if pub is None else FrozenLora.from_state(
            self.weights.spec, pub).to(self.weights.device)
        # Recomputed, not trusted: the lag-0 form is only right if the tensors are equal.
        self._is_published_current = (self.published is not None
                                      and bool(state.get("is_published_current", True))
                                      and self.published.equals(self.adapter))

    def load_adapter_state(self, peft_state: dict[str, torch.Tensor],
                           optimizer_state: dict[str, Any] | None) -> None:
        """Adapter (PEFT names) and AdamW state of a saved version (rollback); then publish."""
        self.adapter.load_peft_state_dict(peft_state)
        self.optimizer.state.clear()
        if optimizer_state is not None:
            self.optimizer.load_state_dict(optimizer_state)
        self._is_published_current = False

    def reset_to_fresh(self) -> None:
        """Fresh adapter (construction seed), empty AdamW state (rollback to v0); then publish."""
        self.adapter.reset(seed=self.seed)
        self.optimizer.state.clear()
        self._is_published_current = False

    def status(self) -> dict[str, Any]:
        """The trainer's part of the ``train`` status block (docs/api.md)."""
        extra = {} if self.compile_info is None else {"compile": self.compile_info}
        return dataclasses.asdict(self.counters) | {"version": self.version} | extra
