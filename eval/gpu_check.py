"""Replay vs recompute training step on CUDA with a larger random-init Llama: one script, torch only.

Runs on the lent GPU machine (torch, no sglang, no network) from the repository root:
    python eval/gpu_check.py               # CUDA, 8 layers of a Llama-3-8B-shaped model, bf16
    python eval/gpu_check.py --cpu-smoke   # tiny shape on CPU, seconds: NOT GPU numbers
(``--device cpu --small`` is the same smoke run.) It imports only ``alchemist_sgl.train`` (which
imports nothing but torch). Recordings are made by the trainer's own forward with ``capture`` (no
HF, no server): this script measures speed, not exactness against an independent reference (tests
do that). It still checks replay's gradients against recompute's in fp32 on a small shape first.

Three arms, interleaved with a rotating order, each one AdamW step over the same samples:
``replay`` (prompt projections read from recordings), ``recompute`` (replay off, the same code)
and ``ceiling`` (the recompute step with EVERY row's projection outputs precomputed, nothing else
changed). It prints one JSON line per result with (f = prompt tokens / all tokens):
  * ``ratio``: median over repetitions of recompute step time / replay step time;
  * ``forward_share``: recompute's forward time (loss included, backward not) / its whole step;
  * ``ideal_ratio`` = 1 / (1 - forward_share * f): what removing the whole prompt forward gives;
  * ``ceiling_ratio``: median of T_rec / (T_rec - (T_rec - T_ceiling) * f), what a zero-overhead
    replay reaches (exact replay still runs attention, norms, RoPE and the LoRA branch; the
    substitution saves matmul time linear in rows, so it is scaled by f);
  * ``ratio_vs_ideal`` and ``ratio_vs_ceiling``: ratio / those.
Note [Timing on CUDA]: step boundaries are host syncs (``torch.cuda.synchronize``); forward times
come from CUDA events recorded around each sample's forward and read after the step's final sync,
so measuring the forward share adds no sync inside the step.
Offload section (``--section offload`` alone; ``all`` runs both): per-layer buffers the size of a
layer's saved tensors (``--offload-tokens``, all the shape's layers) kept resident vs offloaded to a
reused pinned host pool on a side stream (layer 0 first) and reloaded last layer first with one
layer prefetched; real ``torch.cuda.max_memory_allocated`` peaks of both arms, copy GB/s each way.
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
from alchemist_sgl.train.samples import PlannedSample, PlannedSegment, plan_sample  # noqa: E402
from alchemist_sgl.train.spec import EMBED_KEY, FINAL_NORM_KEY, PROJECTIONS, layer_key  # noqa: E402
from eval.gpu_offload import offload_check  # noqa: E402

SHAPES = {  # name: (hidden, layers, heads, kv_heads, intermediate, vocab)
    "small": (64, 4, 4, 2, 192, 1024),
    "smollm2": (576, 30, 9, 3, 1536, 49152),
    "1b": (2048, 16, 32, 8, 8192, 32000),
    "llama3-8b": (4096, 32, 32, 8, 14336, 128256),  # run with --layers (default 8 of the 32)
}
DEFAULT_LAYERS = {"llama3-8b": 8}
CPU_WARNING = "CPU SMOKE RUN: these numbers are NOT GPU numbers (they only show the script runs)"


class _Lora:
    rank, alpha, dropout, targets = 16, 32.0, 0.0, ("q", "k", "v", "o", "gate", "up", "down")


class _Cfg:
    """Duck-typed TrainConfig (the real one lives in alchemist_sgl.config, which needs pyyaml)."""

    def __init__(self, replay: bool) -> None:
        self.replay, self.gradient_mode, self.max_version_lag = replay, "exact", 0
        self.lora, self.objective_negative, self.learning_rate = _Lora(), "unlikelihood", 1e-4


def random_weights(shape: str, dtype: torch.dtype, device: str, seed: int = 0,
                   layers: int | None = None) -> BaseWeights:
    hidden, full_layers, heads, kv, inter, vocab = SHAPES[shape]
    layers = layers or full_layers
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
                 seed: int, every_row: list | None = None) -> list[Sample]:
    """Random-token samples whose prompts are fully covered by recordings of all four projections,
    captured from a no-grad forward of the same weights and adapter. ``every_row``, when given,
    receives per sample the outputs of all prompt + response rows (the ceiling arm's input)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(10, weights.spec.vocab, (prompt + response,), generator=gen)
        plain = Sample(ids[:prompt], ids[prompt:])
        cap: dict[str, list[torch.Tensor]] = {}
        with torch.no_grad():
            forward_logprobs(weights, trainer.adapter, trainer.rope,
                             _single_segment_plan(trainer, plain), capture=cap)
        full = {k: torch.stack(v) for k, v in cap.items()}  # [layers, P + R, width]
        rec = {k: v[:, :prompt].contiguous() for k, v in full.items()}
        if every_row is not None:
            every_row.append(full)
        out.append(Sample(ids[:prompt], ids[prompt:], (PromptSegment(0, prompt, Recording(0, rec)),)))
    return out


def ceiling_plan(planned: PlannedSample, every_row: dict[str, torch.Tensor]) -> PlannedSample:
    """The recompute plan (one computed segment) with every row's projection outputs given."""
    n = planned.input_ids.numel()
    if len(planned.segments) != 1 or planned.segments[0].end != n:
        raise RuntimeError("the recompute plan is not one computed segment")
    return PlannedSample(planned.input_ids, planned.prompt_len,
                         (PlannedSegment(0, n, every_row, 0),), planned.sample, planned.counts)


def _single_segment_plan(trainer: ReplayTrainer, sample: Sample):
    return plan_sample(sample, trainer.weights.spec, version=0, max_version_lag=0,
                       is_replay_enabled=False, dtype=trainer.weights.dtype)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()  # host sync: timing boundary


def timed_step(trainer: ReplayTrainer, plans, device: str) -> tuple[float, float]:
    """(step seconds, forward seconds) of one AdamW step over ``plans`` (Note [Timing on CUDA])."""
    is_cuda = device.startswith("cuda")
    marks: list = []
    fwd_cpu = 0.0
    _sync(device)
    t0 = time.perf_counter()
    trainer.optimizer.zero_grad(set_to_none=True)
    with torch.enable_grad():
        for planned in plans:
            if is_cuda:
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
            t = time.perf_counter()
            loss = sft_loss(trainer.logprobs(planned)) / len(plans)
            if is_cuda:
                end.record()
                marks.append((begin, end))
            else:
                fwd_cpu += time.perf_counter() - t
            loss.backward()
    trainer.optimizer.step()
    _sync(device)
    step_s = time.perf_counter() - t0
    fwd_s = sum(b.elapsed_time(e) for b, e in marks) / 1000.0 if is_cuda else fwd_cpu
    return step_s, fwd_s


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


def run_offload(args: argparse.Namespace, is_gpu: bool) -> dict:
    """The offload section from the command line: one JSON line and a summary line."""
    layers = args.offload_layers or SHAPES[args.shape][1]
    r = offload_check(args.device, args.shape, SHAPES[args.shape], layers, args.offload_tokens,
                      getattr(torch, args.dtype))
    print(json.dumps(r), flush=True)
    print(f"offload: peak {r['peak_bytes_offload'] / 2**20:.1f} MiB vs {r['peak_bytes_no_offload'] / 2**20:.1f} "
          f"MiB resident ({r['measurement']}, reduction {r['reduction']:.3f}, {layers} layers); copies "
          f"{r['d2h_gb_s']:.2f} GB/s to host, {r['h2d_gb_s']:.2f} GB/s back; time x{r['time_ratio']:.2f}"
          + ("" if is_gpu else f"  [{CPU_WARNING}]"), flush=True)
    return r


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="tiny shape and lengths on CPU, seconds (not GPU numbers)")
    ap.add_argument("--small", action="store_true", help="tiny shape and lengths (with --device cpu: "
                    "the same as --cpu-smoke)")
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, default=None,
                    help="layers of the shape to build (default: 8 for llama3-8b, else all)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=1600)
    ap.add_argument("--response", type=int, default=400)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--section", default="all", choices=["all", "replay", "offload"])
    ap.add_argument("--offload-layers", type=int, default=None, help="default: all layers of the shape")
    ap.add_argument("--offload-tokens", type=int, default=2048, help="tokens of saved tensors per layer")
    args = ap.parse_args(argv)
    if args.cpu_smoke:
        args.device, args.small = "cpu", True
    if args.small:
        args.shape, args.layers, args.prompt, args.response = "small", None, 96, 24
        args.samples, args.reps, args.offload_tokens = 2, 5, 120
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --cpu-smoke for the CPU smoke run")
    is_gpu = args.device.startswith("cuda")
    if not is_gpu:
        torch.set_num_threads(1)
    if args.section == "offload":
        return run_offload(args, is_gpu)
    layers = args.layers or DEFAULT_LAYERS.get(args.shape)
    err = grad_check(args.device)
    print(json.dumps({"check": "grad_fp32_small", "max_grad_rel_err_replay_vs_recompute": err}), flush=True)
    if not is_gpu:
        print(CPU_WARNING, flush=True)
    dtype = getattr(torch, args.dtype)
    w = random_weights(args.shape, dtype, args.device, layers=layers)
    arms = {"replay": ReplayTrainer(w, _Cfg(True)), "recompute": ReplayTrainer(w, _Cfg(False))}
    every_row: list[dict[str, torch.Tensor]] = []
    samples = make_samples(w, arms["replay"], args.samples, args.prompt, args.response, seed=2,
                           every_row=every_row)
    plans = {k: [t.plan(s) for s in samples] for k, t in arms.items()}
    plans["ceiling"] = [ceiling_plan(pl, rows) for pl, rows in zip(plans["recompute"], every_row)]
    trainer_of = {"replay": arms["replay"], "recompute": arms["recompute"], "ceiling": arms["recompute"]}
    order = ["replay", "recompute", "ceiling"]
    for k in order:  # warm-up (allocator, kernels)
        timed_step(trainer_of[k], plans[k], args.device)
    times: dict[str, list[float]] = {k: [] for k in order}
    shares: list[float] = []
    peak: dict[str, int] = {}
    for rep in range(args.reps):
        for k in order[rep % 3:] + order[:rep % 3]:
            if is_gpu:
                torch.cuda.reset_peak_memory_stats()
            step_s, fwd_s = timed_step(trainer_of[k], plans[k], args.device)
            times[k].append(step_s)
            if k == "recompute":
                shares.append(fwd_s / step_s)
            if is_gpu:
                peak[k] = max(peak.get(k, 0), torch.cuda.max_memory_allocated())
    f = args.prompt / (args.prompt + args.response)
    ratios = [c / r for c, r in zip(times["recompute"], times["replay"])]
    ceilings = [c / (c - (c - s) * f) for c, s in zip(times["recompute"], times["ceiling"])]
    share = statistics.median(shares)
    ratio, ideal, ceiling = statistics.median(ratios), 1.0 / (1.0 - share * f), statistics.median(ceilings)
    tokens = args.samples * (args.prompt + args.response)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"device": str(torch.cuda.get_device_name() if is_gpu else "cpu"),
              "is_gpu_number": is_gpu, "shape": args.shape, "layers": w.spec.layers,
              "hidden": w.spec.hidden, "dtype": args.dtype, "tokens_per_step": tokens,
              "prompt_fraction": f,
              "step_s_replay": med["replay"], "step_s_recompute": med["recompute"],
              "step_s_ceiling": med["ceiling"],
              "tokens_per_s_replay": tokens / med["replay"],
              "tokens_per_s_recompute": tokens / med["recompute"],
              "ratio": ratio, "ratio_spread": max(ratios) - min(ratios),
              "forward_share": share, "ideal_ratio": ideal, "ceiling_ratio": ceiling,
              "ratio_vs_ideal": ratio / ideal, "ratio_vs_ceiling": ratio / ceiling,
              "repetitions": args.reps, "peak_mem_bytes": peak or None,
              "torch": torch.__version__}
    print(json.dumps(result), flush=True)
    if args.section == "all":
        result["offload"] = run_offload(args, is_gpu)
    tail = "" if is_gpu else f"  [{CPU_WARNING}]"
    print(f"ratio {ratio:.3f} (recompute / replay step time, median of {args.reps}); ideal "
          f"{ideal:.3f}, ceiling {ceiling:.3f}; ratio/ideal {ratio / ideal:.2f}, ratio/ceiling "
          f"{ratio / ceiling:.2f}{tail}")
    return result


if __name__ == "__main__":
    main()
