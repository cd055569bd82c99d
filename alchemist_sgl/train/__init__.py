"""Training: the trainable Llama forward with replay of recorded base projections, LoRA, objectives.

Public API (everything here imports only torch; never sglang, never other package modules):
  * ``BaseWeights`` / ``load_fused_weights`` (weights.py): frozen base tensors in SGLang's layout.
  * ``LlamaSpec`` (spec.py): model shape from a HF config.
  * ``LoraAdapter`` / ``FrozenLora`` (lora.py): PEFT-layout adapter and its published snapshot.
  * ``Sample`` / ``PromptSegment`` / ``Recording`` (samples.py): what the runtime hands over.
  * ``forward_logprobs`` (forward.py): the segment forward with replay and the published adapter.
  * ``ReplayTrainer`` / ``StepStats`` (trainer.py): optimizer steps from samples.
  * ``StepRun`` / ``ScoreRun`` / ``UnitInfo`` (units.py): a step or a scoring pass in work units.
"""

from alchemist_sgl.train.forward import forward_logprobs
from alchemist_sgl.train.lora import FrozenLora, LoraAdapter
from alchemist_sgl.train.samples import PromptSegment, Recording, Sample, plan_sample
from alchemist_sgl.train.spec import LlamaSpec
from alchemist_sgl.train.trainer import ReplayTrainer, StepStats, TrainCounters
from alchemist_sgl.train.units import ScoreRun, StepRun, UnitInfo
from alchemist_sgl.train.weights import BaseWeights, load_fused_weights

__all__ = ["BaseWeights", "FrozenLora", "LlamaSpec", "LoraAdapter", "PromptSegment", "Recording",
           "ReplayTrainer", "Sample", "ScoreRun", "StepRun", "StepStats", "TrainCounters",
           "UnitInfo", "forward_logprobs", "load_fused_weights", "plan_sample"]
