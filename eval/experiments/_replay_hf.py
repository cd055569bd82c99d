"""The HF transformers + PEFT reference arms of the ``replay`` experiment.

Owns sharing the trainer's frozen base tensors with the PEFT model (built by
``eval/hf_reference.py`` with the trainer's exact LoRA tensors), its SFT step computing logits
ONLY for the loss rows (``logits_to_keep``), the same step under ``torch.compile`` (inductor on
CPU; a failure is returned as a string, never raised), and the fp32 reference gradients. Imports torch, transformers and peft.

Note [Loss rows only]: the loss of a sample with prompt P and response R is on the logits of rows
[P - 1, P + R - 1). ``logits_to_keep = R + 1`` makes the model apply the LM head to the last R + 1
rows [P - 1, P + R) only; the last of them predicts past the end and is dropped. The LM head over
the prompt rows (most of a 49k-vocabulary model's head cost) is never computed, as in our trainer.
"""

from __future__ import annotations

import time
import traceback
from typing import Any, Callable, Sequence

import torch

from eval.hf_reference import HF_MODULE


def lora_params(peft_model) -> list[torch.nn.Parameter]:
    return [p for n, p in peft_model.named_parameters() if "lora_" in n]


def share_base(peft_model, weights) -> None:
    """Points the HF model's frozen tensors at row views of our fused ones (equal values: both were
    loaded from the same file in the same dtype), so the base is held once, not twice."""
    from alchemist_sgl.train.spec import TARGET_TO_PROJECTION

    inner = peft_model.base_model.model.model
    spec = weights.spec
    with torch.no_grad():
        for layer, lw in zip(inner.layers, weights.layers):
            for t, name in HF_MODULE.items():
                parent = layer.self_attn if t in ("q", "k", "v", "o") else layer.mlp
                mod = getattr(parent, name).base_layer
                start, end = spec.target_rows(t)
                view = lw.projection(TARGET_TO_PROJECTION[t])[start:end]
                if not torch.equal(mod.weight, view):
                    raise RuntimeError(f"HF {name} differs from the fused base weights")
                mod.weight.data = view
            layer.input_layernorm.weight.data = lw.input_layernorm
            layer.post_attention_layernorm.weight.data = lw.post_attention_layernorm
        if not torch.equal(inner.embed_tokens.weight, weights.embed):
            raise RuntimeError("HF embeddings differ from the fused base weights")
        inner.embed_tokens.weight.data = weights.embed
        inner.norm.weight.data = weights.final_norm
        peft_model.base_model.model.lm_head.weight = inner.embed_tokens.weight


def backward(model: Callable[..., Any], texts: Sequence[tuple[list[int], list[int]]]) -> float:
    """SFT loss (mean response NLL, averaged over samples) backward into the LoRA grads, logits
    for the loss rows only (Note [Loss rows only]). ``model``: the PEFT model or its compiled
    form. Returns the loss."""
    total = 0.0
    for prompt, response in texts:
        ids = torch.tensor([prompt + response])
        logits = model(input_ids=ids, use_cache=False, logits_to_keep=len(response) + 1).logits
        logits = logits[0, :-1].float()
        if logits.shape[0] != len(response):
            raise RuntimeError(f"logits_to_keep gave {logits.shape[0]} rows, expected {len(response)}")
        nll = torch.nn.functional.cross_entropy(logits, torch.tensor(response))
        (nll / len(texts)).backward()
        total += float(nll.detach()) / len(texts)
        del logits, nll
    return total


def step(model: Callable[..., Any], params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer,
         texts: Sequence[tuple[list[int], list[int]]]) -> float:
    """One timed AdamW step (zero grads, forward + backward per sample, update); seconds."""
    t0 = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    backward(model, texts)
    optimizer.step()
    return time.perf_counter() - t0


def reference_grads(peft_model, texts) -> dict[str, torch.Tensor]:
    """LoRA gradients of the eager model, keyed by PEFT's saved names (``...lora_A.weight``), fp64."""
    peft_model.zero_grad(set_to_none=True)
    backward(peft_model, texts)
    grads = {k.replace(".default.weight", ".weight"): p.grad.double().clone()
             for k, p in peft_model.named_parameters() if p.grad is not None}
    peft_model.zero_grad(set_to_none=True)
    return grads


def compiled(peft_model, params, optimizer, texts, restore: Callable[[], None]
             ) -> tuple[Callable[..., Any] | None, float | None, str | None]:
    """(compiled model, compile seconds, None) or (None, None, error string).

    Compile seconds = wall time of the warm-up steps that compile it: one per distinct sequence
    length in ``texts`` (a second shape makes dynamo recompile with dynamic sizes), each including
    its own execution. ``restore`` resets the LoRA tensors after the warm-up steps."""
    try:
        model = torch.compile(peft_model, backend="inductor")
        t0 = time.perf_counter()
        for _ in range(max(1, len({len(p) + len(r) for p, r in texts}))):
            step(model, params, optimizer, texts)
        seconds = time.perf_counter() - t0
        restore()
        return model, seconds, None
    except Exception as exc:  # noqa: BLE001 - reported in the result instead of failing the run
        restore()
        return None, None, "".join(traceback.format_exception_only(exc)).strip()[-2000:]
