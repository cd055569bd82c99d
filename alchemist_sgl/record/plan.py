"""The record plan: which per-layer projection outputs to record under a byte budget (pure).

Owns the choice among the four large projections of a Llama-family decoder layer (MISSION.md
"The technique precisely"): fused ``qkv``, ``o``, fused ``gate_up``, ``down``. Must not import
sglang, torch or package modules other than ``errors``.

Note [Greedy by FLOPs per byte]: replaying a projection y = x W (W: d_in x d_out) saves its forward
matmul, 2 * d_in * d_out FLOPs per token, for d_out stored elements: 2 * d_in FLOPs per stored
element. Projections are taken in decreasing FLOPs-per-byte order (ties: fewer bytes first, then the
layer order qkv, o, gate_up, down) while they fit the budget; one that does not fit is skipped and
cheaper ones are still tried. For SmolLM2 (d_in 576 for qkv/o/gate_up, 1536 for down) down_proj is
the best buy: 25% of projection FLOPs for 11% of the bytes. ``"full"`` records all four.

Note [What replay never saves]: ``prompt_forward_flops_avoided`` divides the replayed projections'
FLOPs over a prompt token by the FLOPs of the whole forward of that token: all four projections,
attention (QK^T and AV at the given context length, averaged over the prompt's positions) and the
elementwise ops (norms, RoPE, SiLU*mul, residual adds; a few FLOPs per hidden element). Replay never
removes attention, norms and elementwise ops (recomputed from the replayed outputs), the LoRA branch
(trained, so always computed) or any of the backward over prompt rows. The LM head is not counted:
training computes logits only for response rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from alchemist_sgl.errors import ConfigError

TENSOR_ORDER = ("qkv", "o", "gate_up", "down")
# Prompt length at which the status number is quoted (MISSION.md "Measured": 410-token prompts).
REFERENCE_CONTEXT_TOKENS = 410
# Elementwise FLOPs per hidden element per layer (2 RMSNorms ~4 each, 2 residual adds); the MLP's
# SiLU*mul and RoPE are counted on their own widths below. An estimate: it is < 1% of the total.
_ELEMENTWISE_FLOPS_PER_HIDDEN = 10


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a Llama-family model that the plan needs. ``dtype_bytes``: 2 bf16, 4 fp32."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    layers: int
    dtype_bytes: int

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any] | Any, dtype_bytes: int) -> ModelShape:
        """From a HF ``config.json`` mapping or a ``PretrainedConfig``-like object."""
        get = (config.get if isinstance(config, Mapping)
               else lambda k, d=None: getattr(config, k, d))
        hidden = int(get("hidden_size"))
        heads = int(get("num_attention_heads"))
        return cls(hidden=hidden, heads=heads,
                   kv_heads=int(get("num_key_value_heads", heads) or heads),
                   head_dim=int(get("head_dim", None) or hidden // heads),
                   intermediate=int(get("intermediate_size")),
                   layers=int(get("num_hidden_layers")), dtype_bytes=dtype_bytes)


@dataclass(frozen=True)
class ProjectionSpec:
    """One recordable projection: output width d_out (elements per token per layer) and d_in."""

    name: str
    d_in: int
    d_out: int

    @property
    def flops_per_token(self) -> int:
        """Forward matmul FLOPs per token per layer."""
        return 2 * self.d_in * self.d_out


def projection_specs(shape: ModelShape) -> dict[str, ProjectionSpec]:
    """The four projections in layer order. qkv output is [q | k | v] (GQA widths)."""
    q = shape.heads * shape.head_dim
    kv = shape.kv_heads * shape.head_dim
    return {
        "qkv": ProjectionSpec("qkv", shape.hidden, q + 2 * kv),
        "o": ProjectionSpec("o", q, shape.hidden),
        "gate_up": ProjectionSpec("gate_up", shape.hidden, 2 * shape.intermediate),
        "down": ProjectionSpec("down", shape.intermediate, shape.hidden),
    }


@dataclass(frozen=True)
class RecordPlan:
    """Which projection outputs are recorded, per layer, for every prefilled prompt token.

    ``tensors``: chosen names in layer order (a subset of TENSOR_ORDER). ``widths``: d_out per
    chosen tensor. The store keeps, per page, one [layers, page_tokens, width] block per tensor in
    the model dtype, so ``bytes_per_token`` = layers * sum(widths) * dtype_bytes exactly (a partial
    tail page still occupies a whole page slot; ``slot_bytes`` is the per-page figure).
    """

    shape: ModelShape
    tensors: tuple[str, ...]
    page_tokens: int

    @property
    def specs(self) -> dict[str, ProjectionSpec]:
        return projection_specs(self.shape)

    @property
    def widths(self) -> dict[str, int]:
        specs = self.specs
        return {name: specs[name].d_out for name in self.tensors}

    @property
    def elements_per_token(self) -> int:
        return self.shape.layers * sum(self.widths.values())

    @property
    def bytes_per_token(self) -> int:
        return self.elements_per_token * self.shape.dtype_bytes

    @property
    def slot_bytes(self) -> int:
        """Bytes of one store page (full or tail)."""
        return self.bytes_per_token * self.page_tokens

    def prompt_forward_flops_avoided(self, context_tokens: int = REFERENCE_CONTEXT_TOKENS) -> float:
        """Replayed projection FLOPs / whole-forward FLOPs of a prompt token, in [0, 1).

        Attention is counted for a prompt of ``context_tokens`` tokens (mean causal span
        (context_tokens + 1) / 2). See Note [What replay never saves].
        """
        if context_tokens < 1:
            raise ValueError("context_tokens must be >= 1")
        specs = self.specs
        saved = self.shape.layers * sum(specs[name].flops_per_token for name in self.tensors)
        return saved / forward_flops_per_token(self.shape, context_tokens)

    def as_status(self) -> dict[str, Any]:
        """The ``record_plan`` entry of ``/alchemist/status`` (INTERFACES.md)."""
        return {"tensors": list(self.tensors), "bytes_per_token": self.bytes_per_token,
                "prompt_forward_flops_avoided": round(self.prompt_forward_flops_avoided(), 4)}


def forward_flops_per_token(shape: ModelShape, context_tokens: int) -> float:
    """FLOPs of one prompt token's forward through all layers (no LM head, no LoRA)."""
    projections = sum(s.flops_per_token for s in projection_specs(shape).values())
    mean_span = (context_tokens + 1) / 2
    attention = 2 * 2 * shape.heads * shape.head_dim * mean_span  # QK^T and AV
    rope = 6 * (shape.heads + shape.kv_heads) * shape.head_dim
    silu_mul = 5 * shape.intermediate
    elementwise = _ELEMENTWISE_FLOPS_PER_HIDDEN * shape.hidden + rope + silu_mul
    return shape.layers * (projections + attention + elementwise)


def choose_plan(shape: ModelShape, budget_bytes_per_token: int | str, page_tokens: int = 16
                ) -> RecordPlan:
    """Greedy choice under ``budget_bytes_per_token`` (int bytes or "full"); see Note [Greedy by FLOPs per byte]."""
    specs = projection_specs(shape)
    if budget_bytes_per_token == "full":
        return RecordPlan(shape, TENSOR_ORDER, page_tokens)
    if isinstance(budget_bytes_per_token, bool) or not isinstance(budget_bytes_per_token, int) \
            or budget_bytes_per_token < 0:
        raise ConfigError("record.budget_bytes_per_token",
                          f"must be a byte count >= 0 or 'full', got {budget_bytes_per_token!r}")

    def bytes_of(name: str) -> int:
        return shape.layers * specs[name].d_out * shape.dtype_bytes

    ranked = sorted(TENSOR_ORDER, key=lambda n: (-2 * specs[n].d_in, bytes_of(n),
                                                 TENSOR_ORDER.index(n)))
    chosen: list[str] = []
    left = budget_bytes_per_token
    for name in ranked:
        if bytes_of(name) <= left:
            chosen.append(name)
            left -= bytes_of(name)
    return RecordPlan(shape, tuple(n for n in TENSOR_ORDER if n in chosen), page_tokens)
