"""Training throughput with replay vs recompute (INTERFACES.md, experiment ``replay``).

What it measures, on SmolLM2-135M-Instruct on this machine's CPU (no server needed):
  * samples: real multi-turn chat text (``ctx.workload()``, SmolLM2 chat template), prompt-heavy
    (prompts ~400 tokens, responses ~100); every prompt fully covered by recordings of all four
    projections. Recordings come from a HF transformers + PEFT forward of the prompt with hooks on
    the frozen base projections (``"recordings_source": "hf-forward"``) until live-server
    recordings exist.
  * three arms per repetition, interleaved with a rotating order: replay (``train.replay=true``),
    recompute (``train.replay=false``, the same code) and an HF transformers + PEFT LoRA step on
    the same samples, same adapter tensors, same loss; each arm = one AdamW step over the batch.
    Adapter parameters are restored after each timed step so every repetition does the same work.
  * ``ratio`` = median over repetitions of recompute time / replay time (same repetition);
    ``ratio_spread`` = (max - min) of those per-repetition ratios.
  * ``forward_share`` = recompute arm's forward time (with graph) / its whole step, same steps;
    ``ideal_ratio`` = 1 / (1 - forward_share * prompt_fraction).
  * ``ceiling_ratio``: the recompute step re-timed with EVERY projection output (prompt and
    response rows) substituted by precomputed tensors; the time saved is scaled by the fraction of
    rows replay actually replays (matmul time is linear in rows), giving what a zero-overhead
    replay would reach: T_recompute / (T_recompute - (T_recompute - T_all_substituted) * f).
  * ``max_grad_rel_err``: max over LoRA tensors of ||g_replay - g_ref|| / ||g_ref||, g_ref the HF
    + PEFT gradients in fp32 (for bf16 too: the error against the fp32 reference);
    ``max_grad_rel_err_recompute`` is the recompute arm's own error, for comparison.
  * ``joint_layout``: the same replay with ``layout="joint"`` (alchemist_sgl/train/joint.py), a
    fifth interleaved arm: its ratio against the same recompute steps, speed, error and memory.
  * ``peak_mem_*_bytes`` (``"peak_mem_measurement": "logical-cpu"``): max over samples of the
    bytes of unique storages autograd saved for backward during one sample's forward (base
    weights and adapter excluded), plus, for replay, the bytes of the recordings it reads.
Top-level fields are for fp32; the ``bf16`` key repeats them in bfloat16 (skipped with --quick).
Threads: ``ALCHEMIST_BENCH_THREADS`` (default 1) to stay stable when other processes share the CPUs.
``ALCHEMIST_REPLAY_MODEL=tiny`` runs the same code on the tiny model (a fast smoke run).
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

import torch

NAME = "replay"
PROMPT_TOKENS, RESPONSE_TOKENS = 400, 100
QUICK = {"samples": 2, "repetitions": 5, "dtypes": (torch.float32,)}
FULL = {"samples": 2, "repetitions": 7, "dtypes": (torch.float32, torch.bfloat16)}
LORA_RANK, LORA_ALPHA = 16, 32.0
_HF_MODULE = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
              "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
_FUSED = {"qkv": ("q", "k", "v"), "o": ("o",), "gate_up": ("gate", "up"), "down": ("down",)}


def run(ctx: Any) -> dict[str, Any]:
    from alchemist_sgl.prepare import resolve_model

    torch.set_num_threads(int(os.environ.get("ALCHEMIST_BENCH_THREADS", "1")))
    p = QUICK if ctx.quick else FULL
    model = os.environ.get("ALCHEMIST_REPLAY_MODEL", "smollm2-135m-instruct")
    folder = resolve_model(model)
    texts = build_chat_samples(folder, ctx.workload(min_turns=2), p["samples"], ctx.seed)
    results = {}
    ref_grads = None
    for dtype in p["dtypes"]:  # fp32 first: its HF gradients are the reference for bf16 too
        results[dtype], ref_grads = measure(folder, texts, dtype, p["repetitions"], ctx.seed, ref_grads)
        _trim()
    out = dict(results[torch.float32])
    if torch.bfloat16 in results:
        out["bf16"] = results[torch.bfloat16]
    import resource
    out.update({"process_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "recordings_source": "hf-forward", "model": model,
                "threads": torch.get_num_threads(), "lora_rank": LORA_RANK,
                "samples_per_step": p["samples"], "load_avg_1m": os.getloadavg()[0]})
    return out


def build_chat_samples(folder, conversations, n: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids) pairs from real conversations: the chat history (several
    conversations joined if needed) trimmed from the front to ~PROMPT_TOKENS with the template,
    then the reference reply (continued with later replies if short) cut at RESPONSE_TOKENS."""
    import random

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    rng = random.Random(seed)
    convs = [c for c in conversations if c.reference_replies]
    rng.shuffle(convs)
    pairs = [(h, r) for c in convs for h, r in zip(c.human_turns, c.reference_replies) if h and r]
    if len(pairs) < 8 * n:
        raise RuntimeError("the workload has too few (human, reply) pairs to build samples")
    samples, cursor = [], 0
    for _ in range(n):
        history: list[dict[str, str]] = []
        while True:
            human, reply = pairs[cursor]
            cursor += 1
            ids = tok.apply_chat_template(history + [{"role": "user", "content": human}],
                                          add_generation_prompt=True, tokenize=True)
            ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
            if len(ids) >= PROMPT_TOKENS:
                break
            history += [{"role": "user", "content": human}, {"role": "assistant", "content": reply}]
        while len(ids) > PROMPT_TOKENS + 40 and len(history) >= 2:
            history = history[2:]
            trimmed = tok.apply_chat_template(history + [{"role": "user", "content": human}],
                                              add_generation_prompt=True, tokenize=True)
            trimmed = list(trimmed["input_ids"] if hasattr(trimmed, "keys") else trimmed)
            if len(trimmed) < PROMPT_TOKENS - 40:
                break
            ids = trimmed
        text, j = reply, cursor
        while len(tok(text)["input_ids"]) < RESPONSE_TOKENS:
            text += " " + pairs[j % len(pairs)][1]
            j += 1
        response = tok(text)["input_ids"][:RESPONSE_TOKENS - 1] + [tok.convert_tokens_to_ids("<|im_end|>")]
        samples.append((ids, response))
    return samples


def _trim() -> None:
    """Return freed memory to the OS between arms (glibc keeps large freed blocks otherwise):
    the benchmark shares a 24 GiB machine with servers."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _hf_model(folder, dtype, adapter):
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
    return peft_model


def _hf_record(peft_model, ids: list[int]) -> dict[str, torch.Tensor]:
    """Base projection outputs of a forward of ``ids`` via hooks on PEFT's frozen base layers,
    written straight into fused [layers, T, out_dim] tensors (q|k|v, gate|up column blocks)."""
    layers = peft_model.base_model.model.model.layers
    out: dict[str, torch.Tensor] = {}
    handles = []
    for i, layer in enumerate(layers):
        for name, parts in _FUSED.items():
            col = 0
            for t in parts:
                parent = layer.self_attn if t in ("q", "k", "v", "o") else layer.mlp
                mod = getattr(parent, _HF_MODULE[t]).base_layer
                width = mod.out_features

                def hook(_m, _i, y, name=name, i=i, col=col, width=width, total=len(parts)):
                    if name not in out:
                        out[name] = y.new_empty(len(layers), y.shape[1], y.shape[2] * total
                                                if name != "qkv" else _qkv_width(peft_model))
                    out[name][i, :, col:col + width] = y.detach()[0]
                handles.append(mod.register_forward_hook(hook))
                col += width
    try:
        with torch.no_grad():
            peft_model(input_ids=torch.tensor([ids]), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return out


def _share_base(peft_model, weights) -> None:
    """Points the HF model's frozen tensors at row views of our fused ones (same values: both were
    loaded from the same file in the same dtype), so the base is held once, not twice."""
    from alchemist_sgl.train.spec import TARGET_TO_PROJECTION

    inner = peft_model.base_model.model.model
    spec = weights.spec
    with torch.no_grad():
        for layer, lw in zip(inner.layers, weights.layers):
            for t, name in _HF_MODULE.items():
                parent = layer.self_attn if t in ("q", "k", "v", "o") else layer.mlp
                mod = getattr(parent, name).base_layer
                start, end = spec.target_rows(t)
                view = lw.projection(TARGET_TO_PROJECTION[t])[start:end]
                assert torch.equal(mod.weight, view)
                mod.weight.data = view
            layer.input_layernorm.weight.data = lw.input_layernorm
            layer.post_attention_layernorm.weight.data = lw.post_attention_layernorm
        assert torch.equal(inner.embed_tokens.weight, weights.embed)
        inner.embed_tokens.weight.data = weights.embed
        inner.norm.weight.data = weights.final_norm
        peft_model.base_model.model.lm_head.weight = inner.embed_tokens.weight


def _qkv_width(peft_model) -> int:
    attn = peft_model.base_model.model.model.layers[0].self_attn
    return sum(getattr(attn, f"{t}_proj").base_layer.out_features for t in ("q", "k", "v"))


def _hf_backward(peft_model, texts) -> None:
    """SFT loss (mean response NLL, averaged over samples) backward into the LoRA grads."""
    for prompt, response in texts:
        ids = torch.tensor([prompt + response])
        logits = peft_model(input_ids=ids, use_cache=False).logits[0].float()
        nll = torch.nn.functional.cross_entropy(logits[len(prompt) - 1:-1], ids[0, len(prompt):])
        (nll / len(texts)).backward()
        del logits, nll


def _hf_step(peft_model, optimizer, texts) -> float:
    t0 = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    _hf_backward(peft_model, texts)
    optimizer.step()
    return time.perf_counter() - t0


def _our_step(trainer, plans) -> tuple[float, float]:
    """trainer.step's work (same calls), timed; returns (step seconds, forward seconds)."""
    from alchemist_sgl.train.objectives import sft_loss

    t0 = time.perf_counter()
    trainer.optimizer.zero_grad(set_to_none=True)
    fwd = 0.0
    with torch.enable_grad():
        for planned in plans:
            t = time.perf_counter()
            loss = sft_loss(trainer.logprobs(planned)) / len(plans)
            fwd += time.perf_counter() - t
            loss.backward()
    trainer.optimizer.step()
    return time.perf_counter() - t0, fwd


def _saved_bytes(trainer, plans, exclude: set[int]) -> int:
    """Max over samples of unique storage bytes saved for backward in one forward."""
    peak = 0
    for planned in plans:
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            st = t.untyped_storage()
            if st.data_ptr() not in exclude:
                seen[st.data_ptr()] = st.nbytes()
            return t
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logp = trainer.logprobs(planned)
        del logp
        rec_bytes = sum(t.numel() * t.element_size() for s in planned.segments for t in s.replay.values())
        peak = max(peak, sum(seen.values()) + rec_bytes)
    return peak


def measure(folder, texts, dtype: torch.dtype, repetitions: int, seed: int,
            ref_grads: dict[str, torch.Tensor] | None = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """One dtype's numbers; ``ref_grads``: the fp32 HF + PEFT LoRA gradients (computed here when
    None, which requires dtype fp32) -- returned for the next dtype's error figures."""
    from alchemist_sgl.config import LoraConfig, TrainConfig
    from alchemist_sgl.train import PromptSegment, Recording, ReplayTrainer, Sample, load_fused_weights
    from alchemist_sgl.train.lora import peft_name
    from alchemist_sgl.train.samples import PlanCounts, PlannedSample, PlannedSegment

    weights = load_fused_weights(folder, dtype=dtype)
    cfg = TrainConfig(lora=LoraConfig(rank=LORA_RANK, alpha=LORA_ALPHA))
    arms = {"replay": ReplayTrainer(weights, cfg, seed=seed),
            "recompute": ReplayTrainer(weights, TrainConfig(lora=cfg.lora, replay=False), seed=seed),
            "replay_joint": ReplayTrainer(weights, cfg, seed=seed, layout="joint")}
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # a non-zero B so every LoRA tensor has a gradient
        for b in arms["replay"].adapter.b.values():
            b.copy_(torch.randn(b.shape, generator=gen) * 0.01)
    arms["recompute"].adapter.load_state_dict(arms["replay"].adapter.state_dict())
    arms["replay_joint"].adapter.load_state_dict(arms["replay"].adapter.state_dict())
    hf = _hf_model(folder, dtype, arms["replay"].adapter)
    _share_base(hf, weights)
    hf_params = [p for n, p in hf.named_parameters() if "lora_" in n]
    hf_opt = torch.optim.AdamW(hf_params, lr=cfg.learning_rate, weight_decay=0.0)
    # One capture per sample over prompt + response (causal: its prompt rows equal a prefill of
    # the prompt alone). Replay reads the prompt rows as views; the ceiling reads every row.
    full = [_hf_record(hf, prompt + response) for prompt, response in texts]
    samples = [Sample(prompt, response, (PromptSegment(0, len(prompt), Recording(
        0, {k: v[:, :len(prompt)] for k, v in rec.items()})),)) for (prompt, response), rec in zip(texts, full)]
    plans = {name: [t.plan(s) for s in samples] for name, t in arms.items()}
    # Ceiling: one segment whose every projection row (prompt and response) is precomputed.
    ceiling_plans = [PlannedSample(pl.input_ids, pl.prompt_len, (PlannedSegment(0, pl.input_ids.numel(), rec),),
                                   pl.sample, PlanCounts()) for pl, rec in zip(plans["recompute"], full)]
    snapshot = {n: {k: v.detach().clone() for k, v in t.adapter.state_dict().items()} for n, t in arms.items()}
    hf_snapshot = [p.detach().clone() for p in hf_params]

    def restore() -> None:
        with torch.no_grad():
            for n, t in arms.items():
                t.adapter.load_state_dict(snapshot[n])
            for p, s in zip(hf_params, hf_snapshot):
                p.copy_(s)

    # Gradients (before any step), against the fp32 HF reference.
    if ref_grads is None:
        if dtype != torch.float32:
            raise ValueError("the fp32 reference gradients come from an fp32 run")
        hf.zero_grad(set_to_none=True)
        _hf_backward(hf, texts)
        ref_grads = {k.replace(".default.weight", ".weight"): p.grad.double()
                     for k, p in hf.named_parameters() if p.grad is not None}
    errs = {}
    for name, trainer in arms.items():
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.accumulate(samples)
        worst = 0.0
        for layer in range(weights.spec.layers):
            for t in trainer.adapter.targets:
                for which, store in (("A", trainer.adapter.a), ("B", trainer.adapter.b)):
                    g, r = store[f"{layer}_{t}"].grad.double(), ref_grads[peft_name(layer, t, which)]
                    worst = max(worst, float((g - r).norm() / r.norm().clamp_min(1e-30)))
        errs[name] = worst
        trainer.optimizer.zero_grad(set_to_none=True)
    hf.zero_grad(set_to_none=True)
    _trim()

    exclude = {t.untyped_storage().data_ptr() for lw in weights.layers
               for t in (lw.qkv, lw.o, lw.gate_up, lw.down, lw.input_layernorm, lw.post_attention_layernorm)}
    exclude |= {weights.embed.untyped_storage().data_ptr(), weights.final_norm.untyped_storage().data_ptr()}
    exclude |= {p.untyped_storage().data_ptr() for t in arms.values() for p in t.adapter.parameters()}
    peak = {n: _saved_bytes(arms[n], plans[n], exclude) for n in arms}

    # Warm-up (untimed), then interleaved repetitions with a rotating arm order.
    _our_step(arms["replay"], plans["replay"]), _our_step(arms["recompute"], plans["recompute"])
    _our_step(arms["recompute"], ceiling_plans), _hf_step(hf, hf_opt, texts)
    _our_step(arms["replay_joint"], plans["replay_joint"])
    restore()
    times: dict[str, list[float]] = {"replay": [], "recompute": [], "hf": [], "ceiling": [],
                                     "replay_joint": []}
    fwd_share = []
    order = ["replay", "recompute", "hf", "ceiling", "replay_joint"]
    for rep in range(repetitions):
        for arm in order[rep % 5:] + order[:rep % 5]:
            if arm == "hf":
                times[arm].append(_hf_step(hf, hf_opt, texts))
            elif arm == "ceiling":
                times[arm].append(_our_step(arms["recompute"], ceiling_plans)[0])
            else:
                step_s, fwd_s = _our_step(arms[arm], plans[arm])
                times[arm].append(step_s)
                if arm == "recompute":
                    fwd_share.append(fwd_s / step_s)
            restore()
            _trim()
    tokens = sum(len(a) + len(b) for a, b in texts)
    replayed = sum(len(a) for a, _ in texts)
    f = replayed / tokens
    ratios = [c / r for c, r in zip(times["recompute"], times["replay"])]
    ratios_joint = [c / r for c, r in zip(times["recompute"], times["replay_joint"])]
    ceilings = [c / (c - (c - s) * f) for c, s in zip(times["recompute"], times["ceiling"])]
    share = statistics.median(fwd_share)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "tokens_per_s_replay": tokens / med["replay"],
        "tokens_per_s_recompute": tokens / med["recompute"],
        "tokens_per_s_hf_reference": tokens / med["hf"],
        "ratio": statistics.median(ratios),
        "ratio_spread": max(ratios) - min(ratios),
        "prompt_fraction": f,
        "forward_share": share,
        "ideal_ratio": 1.0 / (1.0 - share * f),
        "ceiling_ratio": statistics.median(ceilings),
        "max_grad_rel_err": errs["replay"],
        "max_grad_rel_err_recompute": errs["recompute"],
        "dtype": str(dtype).replace("torch.", ""),
        "repetitions": repetitions,
        "peak_mem_replay_bytes": peak["replay"],
        "peak_mem_recompute_bytes": peak["recompute"],
        "peak_mem_measurement": "logical-cpu",
        "tokens_per_step": tokens,
        "step_s_median": {k: v for k, v in med.items()},
        "step_s_all": {k: [round(x, 4) for x in v] for k, v in times.items()},
        "ratio_of_medians": med["recompute"] / med["replay"],
        "joint_layout": {"ratio": statistics.median(ratios_joint),
                         "ratio_spread": max(ratios_joint) - min(ratios_joint),
                         "tokens_per_s": tokens / med["replay_joint"],
                         "max_grad_rel_err": errs["replay_joint"],
                         "peak_mem_bytes": peak["replay_joint"]},
    }, ref_grads
