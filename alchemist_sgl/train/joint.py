"""The joint-layout trainable forward: one [T, H] tensor per layer, recorded row ranges replayed.

Owns ``joint_forward_logprobs``, the same contract as ``forward.forward_logprobs`` (exact gradients
only), as a loop over layer.py's ``joint_layer``, the layer the work units run too. Imports only
torch.

Note [Joint layout]: the segment layout (forward.py, Note [Segments]) keeps one tensor per segment,
so every cheap op, every LoRA matmul and, in backward, every base input-gradient matmul runs once
per segment on fewer rows, and attention concatenates q/k/v. On CPU in bf16 (AMX), where a
100-row matmul costs a third of a 500-row one, that overhead exceeded what replay saved (measured
ratio 0.93 with SmolLM2, 400 + 100 tokens). The joint layout runs every op once over all rows,
exactly as the recompute baseline (which is this code with nothing recorded); only the four base
projections differ (layer.py, Note [Joint layer]): recorded rows are copied in, the other rows
computed, and the backward is one input-gradient matmul over all rows. There are no autograd
slice/cat nodes over the hidden streams, so no zero-filled gradient buffers and no extra backward
copies; the only added cost is one copy of the recorded rows per projection.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from alchemist_sgl.train.forward import head_logprobs
from alchemist_sgl.train.layer import joint_layer
from alchemist_sgl.train.lora import FrozenLora, LoraAdapter
from alchemist_sgl.train.ops import RopeCache
from alchemist_sgl.train.samples import PlannedSample
from alchemist_sgl.train.weights import BaseWeights


def joint_forward_logprobs(weights: BaseWeights, adapter: LoraAdapter | None, rope: RopeCache,
                           planned: PlannedSample, *, is_training: bool = True,
                           published: FrozenLora | None = None,
                           is_published_current: bool = False,
                           is_compiled: bool = False) -> torch.Tensor:
    """Log-probs [R] (fp32) of the response tokens; exact gradients. See Note [Joint layout];
    ``published`` as in forward.py, Note [Published adapter]; ``is_compiled``: layer.py, Note
    [Compiled layer]."""
    hidden = F.embedding(planned.input_ids.to(weights.device), weights.embed)
    residual = None
    for layer in range(weights.spec.layers):
        hidden, residual = joint_layer(weights, layer, adapter, published, is_published_current,
                                       is_training, planned, rope, hidden, residual,
                                       is_compiled=is_compiled)
    lo, hi = planned.prompt_len - 1, planned.input_ids.numel() - 1
    return head_logprobs(weights, planned, [hidden], [residual], lo, hi)
