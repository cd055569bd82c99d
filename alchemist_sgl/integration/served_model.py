"""Views of SGLang's served Llama for the trainer: its parameters as ``BaseWeights``, by reference.

Owns ``served_weights(model)``: wraps ``model.named_parameters()`` (SGLang's fused names; with
``--enable-lora`` the ``.base_layer.`` segment is dropped, the tensor is the same) so the trainer
reads, and the publisher writes, the very storage the served forward uses: no second copy of the
base on the device. Also ``check_in_place_safe(model)``: refuses modules whose weights a CPU kernel
repacked (SGLang's AMX path keeps a packed copy that an in-place edit of ``.weight`` would miss).
"""

from __future__ import annotations

from typing import Any

from alchemist_sgl.errors import ConfigError
from alchemist_sgl.train.spec import LlamaSpec
from alchemist_sgl.train.weights import BaseWeights

SGLANG_NAMES = ("sglang.srt.utils.common.cpu_has_amx_support",)
_PROJECTION_MODULES = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")


def served_weights(model: Any) -> BaseWeights:
    """``BaseWeights`` sharing storage with ``model``'s parameters (a ``LlamaForCausalLM``)."""
    spec = LlamaSpec.from_hf_config(model.config)
    tensors = {name.replace(".base_layer.", "."): p for name, p in model.named_parameters()}
    return BaseWeights.from_tensors(spec, tensors)


def check_in_place_safe(model: Any) -> None:
    """Raises ConfigError when a projection's weight was repacked for a CPU kernel."""
    for i, layer in enumerate(model.model.layers):
        for path in _PROJECTION_MODULES:
            module = layer
            for part in path.split("."):
                module = getattr(module, part)
            module = getattr(module, "base_layer", module)
            if getattr(module, "use_intel_amx_backend", False):
                raise ConfigError("train.enabled", f"layer {i} {path} runs a weight-repacking CPU "
                                  "kernel (AMX): publishing into the live weights in place would "
                                  "not reach the packed copy; set train.enabled=false")
