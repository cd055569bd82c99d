"""An independent reference for the trainer's tests: HF transformers LlamaForCausalLM + PEFT LoRA.

Helpers (imported by the other ``test_train_*`` modules) plus tests of the helpers themselves.
Recordings are captured from the HF+PEFT model with forward hooks on each LoRA layer's
``base_layer`` (the frozen projection, before the LoRA delta is added), q|k|v and gate|up
concatenated into SGLang's fused layout: what SGLang's prefill records, never our own forward.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch

from alchemist_sgl.train import LoraAdapter, PromptSegment, Recording, Sample
from alchemist_sgl.train.spec import ALL_TARGETS

torch.set_num_threads(1)

_HF_MODULE = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
              "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
_FUSED = {"qkv": ("q", "k", "v"), "o": ("o",), "gate_up": ("gate", "up"), "down": ("down",)}


def model_dir(name: str):
    from alchemist_sgl.prepare import resolve_model
    return resolve_model(name)


def build_hf_peft(folder, dtype: torch.dtype, adapter: LoraAdapter):
    """HF Llama in ``dtype`` wrapped by PEFT with ``adapter``'s exact tensors copied in."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa")
    cfg = LoraConfig(r=adapter.rank, lora_alpha=adapter.alpha, lora_dropout=0.0, bias="none",
                     target_modules=[_HF_MODULE[t] for t in adapter.targets])
    peft_model = get_peft_model(model, cfg)
    named = dict(peft_model.named_parameters())
    with torch.no_grad():
        for key, value in adapter.peft_state_dict().items():
            named[key.replace(".weight", ".default.weight")].copy_(value)
    peft_model.eval()
    return peft_model


def hf_layers(peft_model):
    return peft_model.base_model.model.model.layers


def hf_record(peft_model, prompt_ids: torch.Tensor, projections=("qkv", "o", "gate_up", "down")):
    """Base projection outputs of a prefill of ``prompt_ids``: name -> [layers, P, out_dim]."""
    captured: dict[tuple[int, str], torch.Tensor] = {}
    handles = []
    for i, layer in enumerate(hf_layers(peft_model)):
        for t in ALL_TARGETS:
            parent = layer.self_attn if t in ("q", "k", "v", "o") else layer.mlp
            mod = getattr(parent, _HF_MODULE[t])
            mod = getattr(mod, "base_layer", mod)

            def hook(_m, _inp, out, key=(i, t)):
                captured[key] = out.detach()[0].clone()
            handles.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            peft_model(input_ids=prompt_ids.view(1, -1), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    n_layers = len(hf_layers(peft_model))
    return {p: torch.stack([torch.cat([captured[(i, t)] for t in _FUSED[p]], dim=-1)
                            for i in range(n_layers)]) for p in projections}


def hf_logprobs(peft_model, prompt_ids: torch.Tensor, response_ids: torch.Tensor) -> torch.Tensor:
    ids = torch.cat([prompt_ids, response_ids]).view(1, -1)
    logits = peft_model(input_ids=ids, use_cache=False).logits[0].float()
    p = prompt_ids.numel()
    return -torch.nn.functional.cross_entropy(logits[p - 1:-1], response_ids, reduction="none")


def hf_grads(peft_model, samples: list[tuple[torch.Tensor, torch.Tensor, float]]):
    """SFT loss (mean over samples of weight * mean NLL / mean weight) and LoRA grads by PEFT name."""
    peft_model.zero_grad(set_to_none=True)
    mean_w = sum(w for _, _, w in samples) / len(samples)
    total = 0.0
    for prompt, response, w in samples:
        loss = -hf_logprobs(peft_model, prompt, response).mean() * (w / mean_w / len(samples))
        loss.backward()
        total += float(loss.detach())
    grads = {k.replace(".default.weight", ".weight"): p.grad.detach().clone()
             for k, p in peft_model.named_parameters() if p.grad is not None}
    return total, grads


def adapter_grads(adapter: LoraAdapter) -> dict[str, torch.Tensor]:
    from alchemist_sgl.train.lora import peft_name
    out = {}
    for layer in range(adapter.spec.layers):
        for t in adapter.targets:
            out[peft_name(layer, t, "A")] = adapter.a[f"{layer}_{t}"].grad
            out[peft_name(layer, t, "B")] = adapter.b[f"{layer}_{t}"].grad
    return out


def max_rel_err(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    """Max over tensors of ||got - ref|| / ||ref|| (fp64), over ref's keys; missing grad = inf."""
    worst = 0.0
    for k, r in ref.items():
        g = got.get(k)
        if g is None:
            return float("inf")
        r64, g64 = r.double(), g.double()
        worst = max(worst, float((g64 - r64).norm() / r64.norm().clamp_min(1e-30)))
    return worst


def random_adapter(spec, dtype=torch.float32, rank=4, seed=0, targets=ALL_TARGETS) -> LoraAdapter:
    """An adapter with non-zero B, so every target's gradient and every layer's input depend on it."""
    adapter = LoraAdapter(spec, rank=rank, alpha=2.0 * rank, targets=targets, dtype=dtype, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for b in adapter.b.values():
            b.copy_(torch.randn(b.shape, generator=gen) * 0.05)
    return adapter


def covered_sample(prompt, response, ranges, recording, version=0, projections=None, **kw) -> Sample:
    """A sample whose prompt is tiled by ``ranges`` [(start, end, is_covered)]; covered ranges take
    rows of ``recording`` (name -> [L, >=end, out]) restricted to ``projections``."""
    segs = []
    for start, end, is_covered in ranges:
        rec = None
        if is_covered:
            rec = Recording(version, {k: v[:, start:end].contiguous() for k, v in recording.items()
                                      if projections is None or k in projections})
        segs.append(PromptSegment(start, end, rec))
    return Sample(prompt, response, tuple(segs), **kw)


def test_hf_recording_shapes_match_fused_layout():
    from alchemist_sgl.train import load_fused_weights
    weights = load_fused_weights(model_dir("tiny"))
    spec = weights.spec
    adapter = random_adapter(spec)
    peft_model = build_hf_peft(model_dir("tiny"), torch.float32, adapter)
    prompt = torch.arange(5, 17)
    rec = hf_record(peft_model, prompt)
    for name in ("qkv", "o", "gate_up", "down"):
        assert rec[name].shape == (spec.layers, 12, spec.out_dim(name))
    # Layer 0 qkv is the base projection of the normalised embedding: check it from the weights.
    emb = weights.embed[prompt]
    normed = emb * torch.rsqrt(emb.pow(2).mean(-1, keepdim=True) + spec.rms_norm_eps)
    normed = normed * weights.layers[0].input_layernorm
    torch.testing.assert_close(rec["qkv"][0], normed @ weights.layers[0].qkv.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32])
def test_max_rel_err_flags_missing_and_wrong(dtype):
    ref = {"a": torch.ones(3, dtype=dtype)}
    assert max_rel_err({"a": torch.ones(3)}, ref) == 0.0
    assert max_rel_err({}, ref) == float("inf")
    assert max_rel_err({"a": torch.zeros(3)}, ref) == pytest.approx(1.0)
