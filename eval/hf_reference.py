"""The independent reference model: HF transformers ``LlamaForCausalLM`` wrapped by PEFT LoRA.

Owns ``build_hf_peft`` (the one builder of that reference, used by the ``replay`` experiment's HF
arms and by the test suite) and ``HF_MODULE`` (our target names -> HF module names). The adapter
handed in only has to expose ``rank``, ``alpha``, ``targets`` and ``peft_state_dict()`` (our
``LoraAdapter`` does); its tensors are copied in, so the reference computes with the exact LoRA
weights under test, over the base weights read from the model folder on disk (W0).

Imports torch, transformers and peft lazily (importing ``eval`` loads none of them: see
tests/unit/test_eval_boundaries.py); never the server runtime or sglang.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch

HF_MODULE = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
             "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


class PeftExportable(Protocol):
    """What the builder reads from an adapter (``alchemist_sgl.train.LoraAdapter`` fits)."""

    rank: int
    alpha: float
    targets: tuple[str, ...]

    def peft_state_dict(self) -> dict[str, torch.Tensor]: ...


def build_hf_peft(folder: str | Path, dtype: torch.dtype, adapter: PeftExportable) -> torch.nn.Module:
    """HF Llama in ``dtype`` from ``folder`` wrapped by PEFT with ``adapter``'s exact tensors copied
    in; eval mode (no dropout anywhere, as in our trainer with ``lora.dropout: 0``). Returns the
    ``PeftModel``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa")
    cfg = LoraConfig(r=adapter.rank, lora_alpha=adapter.alpha, lora_dropout=0.0, bias="none",
                     target_modules=[HF_MODULE[t] for t in adapter.targets])
    peft_model = get_peft_model(model, cfg)
    named = dict(peft_model.named_parameters())
    with torch.no_grad():
        for key, value in adapter.peft_state_dict().items():
            named[key.replace(".weight", ".default.weight")].copy_(value)
    peft_model.eval()
    return peft_model
