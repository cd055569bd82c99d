"""Replay vs recompute training step on CUDA with a larger random-init Llama: one script, torch only.

Runs on the lent GPU machine (torch, no sglang, no network) from the repository root:
    python eval/gpu_check.py                      # CUDA, ~1B-parameter Llama shape, bf16
    python eval/gpu_check.py --device cpu --small # smoke test on CPU (a few seconds)
It imports only ``alchemist_sgl.train`` (which imports nothing but torch). Recordings are made by
the trainer's own forward with ``capture`` (no HF, no server): this script measures speed, not
exactness against an independent reference (tests do that). It still checks replay's gradients
against recompute's in fp32 on a small shape first, and prints one JSON line per result and the
``ratio`` = median over interleaved repetitions of recompute step time / replay step time.
Finishes in well under 5 minutes on one GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from alchemist_sgl.train import (BaseWeights, LlamaSpec, PromptSegment, Recording,  # noqa: E402
                                 ReplayTrainer, Sample, forward_logprobs)
from alchemist_sgl.train.objectives import sft_loss  # noqa: E402
from alchemist_sgl.train.samples import plan_sample  # noqa: E402
from alchemist_sgl.train.spec import EMBED_KEY, FINAL_NORM_KEY, PROJECTIONS, layer_key  # noqa: E402

SHAPES = {  # name: (hidden, layers, heads, kv_heads, intermediate, vocab)
    "small": (64, 4, 4, 2, 192, 1024),
    "smollm2": (576, 30, 9, 3, 1536, 49152),
    "1b": (2048, 16, 32, 8, 8192, 32000),
}


class _Lora:
    rank, alpha, dropout, targets = 16, 32.0, 0.0, ("q", "k", "v", "o", "gate", "up", "down")


class _Cfg:
    """Duck-typed TrainConfig (the real one lives in alchemist_sgl.config, which needs pyyaml)."""

    def __init__(self, replay: bool) -> None:
        self.replay, self.gradient_mode, self.max_version_lag = replay, "exact", 0
        self.lora, self.objective_negative, self.learning_rate = _Lora(), "unlikelihood", 1e-4


def random_weights(shape: str, dtype: torch.dtype, device: str, seed: int = 0) -> BaseWeights:
    hidden, layers, heads, kv, inter, vocab = SHAPES[shape]
    spec = LlamaSpec(vocab=vocab, hidden=hidden, layers=layers, heads=heads, kv_heads=kv,
                     head_dim=hidden // heads, intermediate=inter, rms_norm_eps=1e-5,
                     rope_theta=100000.0, tie_word_embeddings=True)
    gen = torch.Generator(device=device).manual_seed(seed)
    tensors = {}
    for i in range(layers):
        for p in PROJECTIONS:
            tensors[layer_key(i, p)] = (torch.randn(spec.out_dim(p), spec.in_dim(p), generator=gen,
                                                    device=device) * 0.02).to(dtype)
        for n in ("input_layernorm", "post_attention_layernorm"):
            tensors[layer_key(i, n)] = torch.ones(hidden, device=device, dtype=dtype)
    tensors[EMBED_KEY] = (torch.randn(vocab, hidden, generator=gen, device=device) * 0.02).to(dtype)
    tensors[FINAL_NORM_KEY] = torch.ones(hidden, device=device, dtype=dtype)
    return BaseWeights.from_tensors(spec, tensors)


def make_samples(weights: BaseWeights, trainer: ReplayTrainer, n: int, prompt: int, response: int,
                 seed: int) -> list[Sample]:
    """Random-token samples whose prompts are fully covered by recordings of all four projections,
    captured from a no-grad forward of the same weights and adapter."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(10, weights.spec.vocab, (prompt + response,), generator=gen)
        plain = Sample(ids[:prompt], ids[prompt:])
        cap: dict[str, list[torch.Tensor]] = {}
        with torch.no_grad():
            forward_logprobs(weights, trainer.adapter, trainer.rope,
                             _single_segment_plan(trainer, plain), capture=cap)
        rec = {k: torch.stack(v)[:, :prompt].contiguous() for k, v in cap.items()}
        out.append(Sample(ids[:prompt], ids[prompt:], (PromptSegment(0, prompt, Recording(0, rec)),)))
    return out


def _single_segment_plan(trainer: ReplayTrainer, sample: Sample):
    return plan_sample(sample, trainer.weights.spec, version=0, max_version_lag=0,
                       is_replay_enabled=False, dtype=trainer.weights.dtype)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()  # host sync: timing boundary


def timed_step(trainer: ReplayTrainer, plans, device: str) -> float:
    _sync(device)
    t0 = time.perf_counter()
    trainer.optimizer.zero_grad(set_to_none=True)
    with torch.enable_grad():
        for planned in plans:
            (sft_loss(trainer.logprobs(planned)) / len(plans)).backward()
    trainer.optimizer.step()
    _sync(device)
    return time.perf_counter() - t0


def grad_check(device: str) -> float:
    """fp32, small shape: max norm-wise relative error of replay's LoRA grads vs recompute's."""
    w = random_weights("small", torch.float32, device)
    arms = [ReplayTrainer(w, _Cfg(True)), ReplayTrainer(w, _Cfg(False))]
    with torch.no_grad():
        for b in arms[0].adapter.b.values():
            b.normal_(0, 0.05)
    arms[1].adapter.load_state_dict(arms[0].adapter.state_dict())
    samples = make_samples(w, arms[0], 2, 48, 16, seed=1)
    grads = []
    for t in arms:
        t.optimizer.zero_grad(set_to_none=True)
        t.accumulate(samples)
        grads.append({k: p.grad.double() for k, p in t.adapter.named_parameters()})
    return max(float((grads[0][k] - g).norm() / g.norm().clamp_min(1e-30)) for k, g in grads[1].items())


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="tiny shape and lengths (CPU smoke test)")
    ap.add_argument("--shape", default="1b", choices=sorted(SHAPES))
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=1600)
    ap.add_argument("--response", type=int, default=400)
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args(argv)
    if args.small:
        args.shape, args.prompt, args.response, args.samples, args.reps = "small", 96, 24, 2, 5
    if args.device == "cpu":
        torch.set_num_threads(1)
    err = grad_check(args.device)
    print(json.dumps({"check": "grad_fp32_small", "max_grad_rel_err_replay_vs_recompute": err}), flush=True)
    dtype = getattr(torch, args.dtype)
    w = random_weights(args.shape, dtype, args.device)
    arms = {"replay": ReplayTrainer(w, _Cfg(True)), "recompute": ReplayTrainer(w, _Cfg(False))}
    samples = make_samples(w, arms["replay"], args.samples, args.prompt, args.response, seed=2)
    plans = {k: [t.plan(s) for s in samples] for k, t in arms.items()}
    for k, t in arms.items():  # warm-up (allocator, kernels)
        timed_step(t, plans[k], args.device)
    times: dict[str, list[float]] = {"replay": [], "recompute": []}
    peak: dict[str, int] = {}
    for rep in range(args.reps):
        for k in (("replay", "recompute") if rep % 2 == 0 else ("recompute", "replay")):
            if args.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            times[k].append(timed_step(arms[k], plans[k], args.device))
            if args.device.startswith("cuda"):
                peak[k] = max(peak.get(k, 0), torch.cuda.max_memory_allocated())
    ratios = [c / r for c, r in zip(times["recompute"], times["replay"])]
    tokens = args.samples * (args.prompt + args.response)
    result = {"device": str(torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"),
              "shape": args.shape, "dtype": args.dtype, "tokens_per_step": tokens,
              "prompt_fraction": args.prompt / (args.prompt + args.response),
              "step_s_replay": statistics.median(times["replay"]),
              "step_s_recompute": statistics.median(times["recompute"]),
              "tokens_per_s_replay": tokens / statistics.median(times["replay"]),
              "tokens_per_s_recompute": tokens / statistics.median(times["recompute"]),
              "ratio": statistics.median(ratios), "ratio_spread": max(ratios) - min(ratios),
              "repetitions": args.reps, "peak_mem_bytes": peak or None,
              "torch": torch.__version__}
    print(json.dumps(result), flush=True)
    print(f"ratio {result['ratio']:.3f} (recompute / replay step time, median of {args.reps})")
    return result


if __name__ == "__main__":
    main()
