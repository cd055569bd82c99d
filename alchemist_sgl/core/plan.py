"""The record plan: which per-layer projection outputs to record, and which to keep longest (pure).

Owns the choice among the four large projections of a Llama-family decoder layer (docs/recording-and-replay.md
"The idea"): fused ``qkv``, ``o``, fused ``gate_up``, ``down``. Must not import
sglang, torch or package modules other than ``errors``.

Note [Greedy by FLOPs per byte]: replaying a projection y = x W (W: d_in x d_out) saves its forward
matmul, 2 * d_in * d_out FLOPs per token, for d_out stored elements: 2 * d_in FLOPs per stored
element. The default plan is ``"full"``: all four projections, for every model size, because a
recording is only needed until the next publish (exact replay needs the trainer at the recording's
version; approximate replay at most ``train.max_version_lag`` versions later), so the store frees
older versions at publish instead of budgeting bytes up front (store/index.py, Note [Demote before
evict]). FLOPs per byte still orders the projections twice: under host-pool pressure a page keeps
only its best tensor (``RecordPlan.keep_on_demotion``, ``down`` on Llama shapes: d_in is the
intermediate width, 2.7x hidden for SmolLM2, 4x for Llama-3.2-1B), and the explicit byte budget
(``record.budget_bytes_per_token``) takes projections in decreasing FLOPs-per-byte order (ties:
fewer bytes first, then the layer order qkv, o, gate_up, down) while they fit; one that does not
fit is skipped and cheaper ones are still tried. For SmolLM2 down_proj is the best buy: 25% of
projection FLOPs for 11% of the bytes. ``record.plan`` names the tensors directly instead.

Note [Graph plan]: ``record.plan: graph`` records the four projections plus, per layer, the
attention output ``attn`` (the input of o_proj, heads * head_dim wide, model dtype) and the
per-head natural log-sum-exp of the scaled causal scores ``lse`` (heads wide, fp32 even in a
bf16 model). With the embedding these are everything graph replay needs (train/graph_rows.py
rebuilds the other ``GraphRecording`` fields with the forward's own ops): the trainer then runs
no forward op for the recorded prompt rows. The store keeps one [layers, page_tokens, width]
block per tensor in the model dtype; ``lse`` is stored bit-cast (its fp32 bytes reinterpreted,
so exact), ``widths["lse"]`` = heads * 4 / dtype_bytes storage elements. A demoted graph page
keeps ``down`` (``keep_on_demotion``, as for ``full``).

Note [What replay never saves]: ``prompt_forward_flops_avoided`` divides the replayed projections'
FLOPs over a prompt token by the FLOPs of the whole forward of that token: all four projections,
attention (QK^T and AV at the given context length, averaged over the prompt's positions) and the
elementwise ops (norms, RoPE, SiLU*mul, residual adds; a few FLOPs per hidden element). Projection
replay never removes attention, norms and elementwise ops (recomputed from the replayed outputs).
The graph plan (Note [Graph plan]) removes the whole forward of a recorded prompt row: 1.0 (the
rebuild of the norm statistics and RoPE from the recording is elementwise and not counted; the
prompt's last row, the first response token's label row, is still computed). No plan removes the
LoRA branch's backward-side products (trained, so always computed) or any of the backward over
prompt rows. The LM head is not counted: training computes logits only for response rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from alchemist_sgl.errors import ConfigError

TENSOR_ORDER = ("qkv", "o", "gate_up", "down")
# The graph plan's tensors beyond the four projections (Note [Graph plan]); ``lse`` is fp32.
GRAPH_EXTRAS = ("attn", "lse")
GRAPH_TENSORS = TENSOR_ORDER + GRAPH_EXTRAS
FP32_TENSORS = ("lse",)
# Prompt length at which the status number is quoted (410-token prompts, docs/recording-and-replay.md).
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
    def from_hf_config(cls, config: Mapping[str, Any] | object, dtype_bytes: int) -> ModelShape:
        """From a HF ``config.json`` mapping or a ``PretrainedConfig``-like object."""
        get: Callable[..., Any] = (config.get if isinstance(config, Mapping)
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

    ``tensors``: chosen names in layer order (a subset of TENSOR_ORDER, or GRAPH_TENSORS for the
    graph plan). ``widths``: storage elements (model dtype) per token per layer of each chosen
    tensor: d_out for a projection, heads * head_dim for ``attn``, the bit-cast fp32 ``lse``
    heads * 4 / dtype_bytes (Note [Graph plan]). The store keeps, per page, one
    [layers, page_tokens, width] block per tensor in the model dtype, so ``bytes_per_token`` =
    layers * sum(widths) * dtype_bytes exactly (lse at 4 bytes a head; a partial tail page still
    occupies a whole page slot; ``slot_bytes`` is the per-page figure).
    """

    shape: ModelShape
    tensors: tuple[str, ...]
    page_tokens: int

    @property
    def specs(self) -> dict[str, ProjectionSpec]:
        return projection_specs(self.shape)

    @property
    def is_graph(self) -> bool:
        """The graph plan (Note [Graph plan])."""
        return all(name in self.tensors for name in GRAPH_EXTRAS)

    @property
    def projections(self) -> tuple[str, ...]:
        """The recorded projections (``tensors`` without the graph extras), layer order."""
        return tuple(name for name in self.tensors if name in TENSOR_ORDER)

    @property
    def widths(self) -> dict[str, int]:
        specs, shape = self.specs, self.shape
        extra = {"attn": shape.heads * shape.head_dim, "lse": shape.heads * 4 // shape.dtype_bytes}
        return {name: specs[name].d_out if name in specs else extra[name] for name in self.tensors}

    @property
    def keep_on_demotion(self) -> str | None:
        """The tensor a demoted page keeps (the best FLOPs per byte); None for a one-tensor plan."""
        if len(self.tensors) < 2:
            return None
        return ranked_by_flops_per_byte(self.shape, self.projections)[0]

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
        """Replayed projection FLOPs / whole-forward FLOPs of a prompt token, in [0, 1); 1.0 for
        the graph plan (no forward op of a recorded row runs).

        Attention is counted for a prompt of ``context_tokens`` tokens (mean causal span
        (context_tokens + 1) / 2). See Note [What replay never saves].
        """
        if context_tokens < 1:
            raise ValueError("context_tokens must be >= 1")
        if self.is_graph:
            return 1.0
        specs = self.specs
        saved = self.shape.layers * sum(specs[name].flops_per_token for name in self.tensors)
        return saved / forward_flops_per_token(self.shape, context_tokens)

    def as_status(self) -> dict[str, Any]:
        """The ``record_plan`` entry of ``/alchemist/status`` (docs/api.md)."""
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


def ranked_by_flops_per_byte(shape: ModelShape, names: Sequence[str]) -> list[str]:
    """``names`` best buy first: FLOPs saved per stored byte, then fewer bytes, then layer order."""
    specs = projection_specs(shape)
    return sorted(names, key=lambda n: (-2 * specs[n].d_in, specs[n].d_out, TENSOR_ORDER.index(n)))


def choose_plan(shape: ModelShape, plan: int | str | Sequence[str] = "full", page_tokens: int = 16
                ) -> RecordPlan:
    """The recorded tensors: ``"full"`` (all four, the default), ``"graph"`` (the four and the
    attention's output and log-sum-exp, Note [Graph plan]), a tensor name or a list of names
    (``record.plan``), or an int byte budget per token chosen greedily (``record.budget_bytes_per_token``).

    See Note [Greedy by FLOPs per byte]. Raises ConfigError naming the key for a bad value.
    """
    if plan == "full":
        return RecordPlan(shape, TENSOR_ORDER, page_tokens)
    if plan == "graph":
        if shape.heads * 4 % shape.dtype_bytes:
            raise ConfigError("record.plan", f"graph needs a 2- or 4-byte model dtype, got "
                              f"{shape.dtype_bytes} bytes")
        return RecordPlan(shape, GRAPH_TENSORS, page_tokens)
    if isinstance(plan, int) and not isinstance(plan, bool):
        return _greedy(shape, plan, page_tokens)
    names = (plan,) if isinstance(plan, str) else tuple(plan) if isinstance(plan, (list, tuple)) else None
    if not names or any(n not in TENSOR_ORDER for n in names) or len(set(names)) != len(names):
        raise ConfigError("record.plan", f"must be 'full', 'graph', one of {list(TENSOR_ORDER)} or a list of "
                          f"distinct names from it, got {plan!r}")
    return RecordPlan(shape, tuple(n for n in TENSOR_ORDER if n in names), page_tokens)


def _greedy(shape: ModelShape, budget_bytes_per_token: int, page_tokens: int) -> RecordPlan:
    if budget_bytes_per_token < 0:
        raise ConfigError("record.budget_bytes_per_token",
                          f"must be a byte count >= 0 or 'full', got {budget_bytes_per_token!r}")
    specs = projection_specs(shape)

    def bytes_of(name: str) -> int:
        return shape.layers * specs[name].d_out * shape.dtype_bytes

    chosen: list[str] = []
    left = budget_bytes_per_token
    for name in ranked_by_flops_per_byte(shape, TENSOR_ORDER):
        if bytes_of(name) <= left:
            chosen.append(name)
            left -= bytes_of(name)
    return RecordPlan(shape, tuple(n for n in TENSOR_ORDER if n in chosen), page_tokens)
