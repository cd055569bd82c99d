"""The frozen base weights the trainable forward reads, in SGLang's fused layout.

Owns ``BaseWeights``: references (never copies) to the serving model's tensors, keyed by SGLang's
parameter names (``model.layers.{i}.self_attn.qkv_proj.weight`` [q|k|v rows], ``o_proj``,
``mlp.gate_up_proj.weight`` [gate|up rows], ``down_proj``, the two layer norms,
``model.embed_tokens.weight``, ``model.norm.weight``; ``lm_head.weight`` only when untied), and
``load_fused_weights``, which builds the same mapping from a HF safetensors folder by fusing q/k/v
and gate/up (for tests and benchmarks, where no SGLang model exists).

Contract: ``BaseWeights.from_tensors`` keeps the given tensors by reference (``detach()`` shares
storage), so handing it ``dict(sglang_model.named_parameters())`` costs no second copy of the base.
The trainer never writes them (publishing rebuilds them from a master copy of W0). Imports only torch
(``safetensors`` lazily, inside the loader).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from alchemist_sgl.train.spec import (EMBED_KEY, FINAL_NORM_KEY, LM_HEAD_KEY, PROJECTIONS,
                                      LlamaSpec, layer_key)


@dataclass
class LayerWeights:
    """One decoder layer's frozen tensors. Shapes: qkv [q+2kv, H], o [H, q], gate_up [2F, H],
    down [H, F], norms [H]."""

    qkv: torch.Tensor
    o: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor
    input_layernorm: torch.Tensor
    post_attention_layernorm: torch.Tensor

    def projection(self, name: str) -> torch.Tensor:
        tensor: torch.Tensor = getattr(self, name)
        return tensor


@dataclass
class BaseWeights:
    """All frozen tensors of the base model plus its ``LlamaSpec``; ``lm_head`` is ``embed`` when tied."""

    spec: LlamaSpec
    embed: torch.Tensor          # [V, H]
    final_norm: torch.Tensor     # [H]
    lm_head: torch.Tensor        # [V, H]; the same tensor object as embed when tied
    layers: list[LayerWeights]

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @classmethod
    def from_tensors(cls, spec: LlamaSpec, tensors: Mapping[str, torch.Tensor]) -> "BaseWeights":
        """Wraps SGLang-named tensors by reference. Raises KeyError naming a missing tensor and
        ValueError on a shape that does not match ``spec`` or an inference tensor."""

        def get(key: str, shape: tuple[int, ...]) -> torch.Tensor:
            if key not in tensors:
                raise KeyError(f"base weight '{key}' is missing")
            t = tensors[key].detach()
            if t.is_inference():
                raise ValueError(f"base weight '{key}' is an inference tensor (created under "
                                 f"torch.inference_mode); autograd cannot save it for backward")
            if tuple(t.shape) != shape:
                raise ValueError(f"base weight '{key}' has shape {tuple(t.shape)}, expected {shape}")
            return t

        h = spec.hidden
        layers = []
        for i in range(spec.layers):
            proj = {p: get(layer_key(i, p), (spec.out_dim(p), spec.in_dim(p))) for p in PROJECTIONS}
            layers.append(LayerWeights(
                **proj, input_layernorm=get(layer_key(i, "input_layernorm"), (h,)),
                post_attention_layernorm=get(layer_key(i, "post_attention_layernorm"), (h,))))
        embed = get(EMBED_KEY, (spec.vocab, h))
        lm_head = embed if spec.tie_word_embeddings else get(LM_HEAD_KEY, (spec.vocab, h))
        return cls(spec=spec, embed=embed, final_norm=get(FINAL_NORM_KEY, (h,)),
                   lm_head=lm_head, layers=layers)


def fuse_hf_state_dict(spec: LlamaSpec, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF Llama names (q/k/v_proj, gate/up_proj) -> SGLang fused names. Copies only where it fuses."""
    out: dict[str, torch.Tensor] = {}
    for i in range(spec.layers):
        p = f"model.layers.{i}."
        out[layer_key(i, "qkv")] = torch.cat(
            [state[p + f"self_attn.{n}_proj.weight"] for n in ("q", "k", "v")], dim=0)
        out[layer_key(i, "gate_up")] = torch.cat(
            [state[p + f"mlp.{n}_proj.weight"] for n in ("gate", "up")], dim=0)
        out[layer_key(i, "o")] = state[p + "self_attn.o_proj.weight"]
        out[layer_key(i, "down")] = state[p + "mlp.down_proj.weight"]
        for norm in ("input_layernorm", "post_attention_layernorm"):
            out[layer_key(i, norm)] = state[p + f"{norm}.weight"]
    out[EMBED_KEY] = state[EMBED_KEY]
    out[FINAL_NORM_KEY] = state[FINAL_NORM_KEY]
    if not spec.tie_word_embeddings:
        out[LM_HEAD_KEY] = state[LM_HEAD_KEY]
    return out


def load_fused_weights(folder: str | Path, dtype: torch.dtype = torch.float32,
                       device: str | torch.device = "cpu") -> BaseWeights:
    """Loads a HF Llama safetensors folder (``config.json`` + ``*.safetensors``) into SGLang's
    fused layout, cast to ``dtype`` on ``device``. For tests and benchmarks."""
    from safetensors.torch import load_file

    folder = Path(folder)
    spec = LlamaSpec.from_hf_config(json.loads((folder / "config.json").read_text()))
    state: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(file)))
    if not state:
        raise FileNotFoundError(f"no *.safetensors in {folder}")
    fused = fuse_hf_state_dict(spec, state)
    return BaseWeights.from_tensors(
        spec, {k: v.to(device=device, dtype=dtype).contiguous() for k, v in fused.items()})
