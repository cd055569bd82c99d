"""The shape and numeric constants of a Llama-family model, as the trainable forward needs them.

Owns ``LlamaSpec`` (read from a HF ``config.json`` mapping or a ``PretrainedConfig``-like object,
which is what SGLang's ``model.config`` is) and the names of the base weight tensors in SGLang's
layout. Imports only the standard library: ``alchemist_sgl.train`` must run where only torch is
installed (``eval/gpu_check.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

# The four large projections of a decoder layer, in layer order (same names as core/plan.py).
PROJECTIONS = ("qkv", "o", "gate_up", "down")
# LoRA targets (PEFT module names without "_proj") and the fused SGLang projection each lives in.
TARGET_TO_PROJECTION = {"q": "qkv", "k": "qkv", "v": "qkv", "o": "o",
                        "gate": "gate_up", "up": "gate_up", "down": "down"}
ALL_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass(frozen=True)
class LlamaSpec:
    """Dimensions and constants of a Llama/Qwen2/Mistral/SmolLM2-style decoder (no biases).

    Only the default RoPE (``rope_type`` "default" or no scaling) is supported; anything else raises
    ``ValueError`` at construction, so a model we cannot mirror exactly is refused loudly.
    """

    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    rms_norm_eps: float
    rope_theta: float
    is_neox_style: bool = True
    tie_word_embeddings: bool = True

    @property
    def q_size(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.kv_heads * self.head_dim

    def out_dim(self, projection: str) -> int:
        """Output width of a fused projection (what one recorded row holds)."""
        return {"qkv": self.q_size + 2 * self.kv_size, "o": self.hidden,
                "gate_up": 2 * self.intermediate, "down": self.hidden}[projection]

    def in_dim(self, projection: str) -> int:
        return {"qkv": self.hidden, "o": self.q_size, "gate_up": self.hidden,
                "down": self.intermediate}[projection]

    def target_dims(self, target: str) -> tuple[int, int]:
        """(d_in, d_out) of one PEFT LoRA target (q, k, v, o, gate, up, down)."""
        d_in = self.in_dim(TARGET_TO_PROJECTION[target])
        d_out = {"q": self.q_size, "k": self.kv_size, "v": self.kv_size, "o": self.hidden,
                 "gate": self.intermediate, "up": self.intermediate, "down": self.hidden}[target]
        return d_in, d_out

    def target_rows(self, target: str) -> tuple[int, int]:
        """Row range [start, end) of a target inside its fused base weight (SGLang order)."""
        q, kv, f = self.q_size, self.kv_size, self.intermediate
        return {"q": (0, q), "k": (q, q + kv), "v": (q + kv, q + 2 * kv),
                "o": (0, self.hidden), "gate": (0, f), "up": (f, 2 * f),
                "down": (0, self.hidden)}[target]

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any] | Any) -> "LlamaSpec":
        """From a HF ``config.json`` mapping or a config object (e.g. SGLang's ``model.config``)."""
        if not isinstance(config, Mapping):
            config = config.to_dict() if hasattr(config, "to_dict") else vars(config)
        hidden = int(config["hidden_size"])
        heads = int(config["num_attention_heads"])
        rope = config.get("rope_parameters") or {}
        scaling = config.get("rope_scaling") or {}
        rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
        if rope_type != "default":
            raise ValueError(f"rope_type '{rope_type}' is not supported by the trainable forward")
        theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
        if config.get("attention_bias") or config.get("mlp_bias"):
            raise ValueError("biased projections are not supported by the trainable forward")
        if config.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act '{config.get('hidden_act')}' is not supported")
        return cls(vocab=int(config["vocab_size"]), hidden=hidden,
                   layers=int(config["num_hidden_layers"]), heads=heads,
                   kv_heads=int(config.get("num_key_value_heads") or heads),
                   head_dim=int(config.get("head_dim") or hidden // heads),
                   intermediate=int(config["intermediate_size"]),
                   rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)), rope_theta=float(theta),
                   is_neox_style=bool(config.get("rope_is_neox_style", True)),
                   tie_word_embeddings=bool(config.get("tie_word_embeddings", False)))


def layer_key(layer: int, name: str) -> str:
    """SGLang parameter name of a per-layer base tensor.

    ``name``: qkv, o, gate_up, down, input_layernorm, post_attention_layernorm.
    """
    sub = {"qkv": "self_attn.qkv_proj.weight", "o": "self_attn.o_proj.weight",
           "gate_up": "mlp.gate_up_proj.weight", "down": "mlp.down_proj.weight",
           "input_layernorm": "input_layernorm.weight",
           "post_attention_layernorm": "post_attention_layernorm.weight"}[name]
    return f"model.layers.{layer}.{sub}"


EMBED_KEY = "model.embed_tokens.weight"
FINAL_NORM_KEY = "model.norm.weight"
LM_HEAD_KEY = "lm_head.weight"
