"""Trainer rigs for the work-unit tests: a config, trainers loaded with a given adapter, the
published weights W_pub = cast(W0 + s * B_P @ A_P), and the ``tiny`` fixture (fp32 tiny weights, a
published adapter P and a trained adapter T != P).

Imports torch, the trainer, the online loop's merge (online/publish.py) and tests/support/hfref.py;
never sglang.
"""

from __future__ import annotations

import pytest

from alchemist_sgl.config import LoraConfig, TrainConfig
from alchemist_sgl.online.publish import merged_tensor
from alchemist_sgl.train import BaseWeights, FrozenLora, ReplayTrainer, StepRun, load_fused_weights
from alchemist_sgl.train.spec import EMBED_KEY, FINAL_NORM_KEY, LM_HEAD_KEY, PROJECTIONS, layer_key
from tests.support.hfref import model_dir, random_adapter


def train_cfg(**kw) -> TrainConfig:
    return TrainConfig(lora=LoraConfig(rank=4, alpha=8.0), learning_rate=5e-3, **kw)


def published_weights(weights: BaseWeights, frozen: FrozenLora | None) -> BaseWeights:
    """Copies of the base tensors with ``frozen`` merged in as the online loop publishes it:
    W_pub = cast(W0 + s * B @ A) (tests/unit/test_train_lora.py checks that merge against PEFT)."""
    spec = weights.spec
    tensors = {layer_key(i, n): getattr(lw, n).clone() for i, lw in enumerate(weights.layers)
               for n in (*PROJECTIONS, "input_layernorm", "post_attention_layernorm")}
    tensors |= {EMBED_KEY: weights.embed.clone(), FINAL_NORM_KEY: weights.final_norm.clone()}
    if not spec.tie_word_embeddings:
        tensors[LM_HEAD_KEY] = weights.lm_head.clone()
    if frozen is not None:  # the online loop's own merge (online/publish.py), per fused projection
        for i, lw in enumerate(weights.layers):
            for p in PROJECTIONS:
                tensors[layer_key(i, p)] = merged_tensor(lw.projection(p), frozen.pairs(i, p),
                                                         frozen.scale, spec)
    return BaseWeights.from_tensors(spec, tensors)


def make_trainer(weights: BaseWeights, adapter, published: FrozenLora | None = None,
             layout: str = "joint", **cfg_kw) -> ReplayTrainer:
    trainer = ReplayTrainer(weights, train_cfg(**cfg_kw), layout=layout)
    trainer.adapter.load_state_dict(adapter.state_dict())  # keeps the optimizer's parameters
    if published is not None:
        trainer.set_published(published)
    return trainer


def run_to_optimizer(run: StepRun) -> list:
    """All units but the optimizer's (which steps and zeroes the gradients); their UnitInfos."""
    infos = []
    while run.units < run.units_total - 1:
        infos.append(run.run_unit())
    return infos


@pytest.fixture(scope="module")
def tiny():
    weights = load_fused_weights(model_dir("tiny"))
    published = random_adapter(weights.spec, rank=4, seed=10)   # P
    trained = random_adapter(weights.spec, rank=4, seed=20)     # T != P
    return weights, published, trained
