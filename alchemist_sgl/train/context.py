"""What the layer and the work units read from the trainer, as narrow types (no trainer import).

Owns ``TrainSettings`` / ``LoraSettings`` (the attributes of ``alchemist_sgl.config.TrainConfig``
the trainer reads, as Protocols: the train package never imports the config module),
``LayerContext`` (what one decoder layer reads: layer.py's ``run_layer``) and ``UnitTrainer``
(what units.py, rounds.py and optimizer_unit.py read and call: ``ReplayTrainer`` satisfies it).
With these, train/ imports in one direction: trainer.py -> rounds.py -> units.py -> layer.py ->
context.py. Imports only torch and lower train/ modules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, Sequence

import torch

from alchemist_sgl.train.lora import FrozenLora, LoraAdapter
from alchemist_sgl.train.offload import SavedTensorOffload
from alchemist_sgl.train.ops import RopeCache
from alchemist_sgl.train.samples import PlanCounts, PlannedSample, Sample
from alchemist_sgl.train.stats import StepStats
from alchemist_sgl.train.weights import BaseWeights

Layout = Literal["joint", "segments"]
GradientMode = Literal["exact", "response_only"]


class LoraSettings(Protocol):
    """``train.lora``: the adapter's shape."""

    @property
    def rank(self) -> int: ...
    @property
    def alpha(self) -> float: ...
    @property
    def dropout(self) -> float: ...
    @property
    def targets(self) -> Sequence[str]: ...


class TrainSettings(Protocol):
    """The ``train`` settings the trainer reads (``compile`` and ``loss_chunk_rows`` are read with
    defaults, False and 256, so a duck-typed config may leave them out)."""

    @property
    def replay(self) -> bool: ...
    @property
    def gradient_mode(self) -> GradientMode: ...
    @property
    def max_version_lag(self) -> int: ...
    @property
    def lora(self) -> LoraSettings: ...
    @property
    def objective_negative(self) -> str: ...
    @property
    def learning_rate(self) -> float: ...


@dataclass(frozen=True)
class LayerContext:
    """Everything one decoder layer reads besides its inputs: the frozen base, the trainer's
    layout, the RoPE tables, the published adapter (forward.py, Note [Published adapter]) and
    whether the compiled layer may run (layer.py, Note [Compiled layer]). Made per layer call by
    ``ReplayTrainer.layer_context``, so it always shows the trainer's current published adapter."""

    weights: BaseWeights
    layout: Layout
    rope: RopeCache
    published: FrozenLora | None
    is_published_current: bool
    is_compiled: bool


class UnitTrainer(Protocol):
    """What the work units (units.py), rounds (rounds.py) and the optimizer unit read and call."""

    @property
    def weights(self) -> BaseWeights: ...
    @property
    def config(self) -> TrainSettings: ...
    @property
    def layout(self) -> Layout: ...
    @property
    def adapter(self) -> LoraAdapter: ...
    @property
    def optimizer(self) -> torch.optim.Optimizer: ...
    @property
    def rope(self) -> RopeCache: ...
    @property
    def published(self) -> FrozenLora | None: ...
    @property
    def loss_chunk_rows(self) -> int: ...
    @property
    def kl_ema(self) -> float: ...
    @property
    def residency(self) -> SavedTensorOffload | None: ...

    def layer_context(self) -> LayerContext: ...

    def plan(self, sample: Sample, *, is_replay_enabled: bool | None = None) -> PlannedSample: ...

    def on_optimizer_step(self, ratios: list[float]) -> None: ...

    def record_step(self, loss: float, samples: int, tokens: int, c: PlanCounts, step_ms: float,
                    max_unit_ms: float, units: int, is_skipped: bool) -> StepStats: ...
