"""The independent reference for the trainer's tests: HF transformers LlamaForCausalLM + PEFT LoRA.

Owns the helpers around ``eval.hf_reference.build_hf_peft`` (the one builder, shared with the
``replay`` experiment): recordings captured from the HF+PEFT model with forward hooks on each LoRA
layer's ``base_layer`` (the frozen projection, before the LoRA delta is added), q|k|v and gate|up
concatenated into SGLang's fused layout (what SGLang's prefill records, never our own forward);
HF log-probs and SFT gradients; adapters with non-zero B; covered samples; and the replay cases
(prompt/response lengths and coverage layouts) several trainer tests share.
Imports torch, the trainer's value types and eval/; never sglang.
"""

from __future__ import annotations

import pytest
import torch

from alchemist_sgl.train import LoraAdapter, PromptSegment, Recording, Sample, load_fused_weights
from alchemist_sgl.train.spec import ALL_TARGETS
from eval.hf_reference import HF_MODULE, build_hf_peft

__all__ = ["CASES", "adapter_grads", "build_hf_peft", "build_samples", "covered_sample", "hf_grads",
           "hf_layers", "hf_logprobs", "hf_record", "ids_of", "max_rel_err", "model_dir",
           "random_adapter", "tiny"]

_FUSED = {"qkv": ("q", "k", "v"), "o": ("o",), "gate_up": ("gate", "up"), "down": ("down",)}


def model_dir(name: str):
    from alchemist_sgl.prepare import resolve_model
    return resolve_model(name)


def hf_layers(peft_model):
    return peft_model.base_model.model.model.layers


def hf_record(peft_model, prompt_ids: torch.Tensor, projections=("qkv", "o", "gate_up", "down")):
    """Base projection outputs of a prefill of ``prompt_ids``: name -> [layers, P, out_dim]."""
    captured: dict[tuple[int, str], torch.Tensor] = {}
    handles = []
    for i, layer in enumerate(hf_layers(peft_model)):
        for t in ALL_TARGETS:
            parent = layer.self_attn if t in ("q", "k", "v", "o") else layer.mlp
            mod = getattr(parent, HF_MODULE[t])
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


def ids_of(seed: int, n: int) -> torch.Tensor:
    return torch.randint(10, 40000, (n,), generator=torch.Generator().manual_seed(seed))


CASES = {
    # name: list of (prompt_len, response_len, ranges as (start, end, is_covered), projections)
    "full_varied_lengths": [(37, 9, [(0, 37, True)], None), (64, 23, [(0, 64, True)], None),
                            (5, 1, [(0, 5, True)], None)],
    "partial_tensors_down_only": [(40, 12, [(0, 40, True)], ("down",))],
    "partial_tensors_qkv_o": [(40, 12, [(0, 40, True)], ("qkv", "o"))],
    "partial_coverage_prefix": [(50, 10, [(0, 32, True), (32, 50, False)], None)],
    "zero_coverage": [(30, 8, [(0, 30, False)], None)],
    "hole_in_middle": [(60, 11, [(0, 20, True), (20, 35, False), (35, 60, True)], None)],
    "many_segments": [(48, 7, [(0, 8, True), (8, 16, False), (16, 24, True), (24, 40, True),
                               (40, 48, False)], ("qkv", "gate_up", "down"))],
}


def build_samples(case, peft_model, seed0=0, version=0):
    samples, ref = [], []
    for j, (p, r, ranges, projections) in enumerate(case):
        prompt, response = ids_of(seed0 + 2 * j, p), ids_of(seed0 + 2 * j + 1, r)
        rec = hf_record(peft_model, prompt)
        samples.append(covered_sample(prompt, response, ranges, rec, version=version,
                                      projections=projections, weight=1.0 + j))
        ref.append((prompt, response, 1.0 + j))
    return samples, ref


@pytest.fixture(scope="module")
def tiny():
    """(fp32 tiny weights, a random adapter with B != 0, the HF+PEFT reference over them)."""
    weights = load_fused_weights(model_dir("tiny"))
    adapter = random_adapter(weights.spec, rank=4)
    return weights, adapter, build_hf_peft(model_dir("tiny"), torch.float32, adapter)
