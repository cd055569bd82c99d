"""Training's device memory with and without saved-tensor offload (docs/results.md, ``memory``).

No server: the trainer the server runs (``ReplayTrainer``, one step as work units, units.py) on
real chat text tokenized with the model's tokenizer, with ``trainer.residency`` set to a
``SavedTensorOffload`` over a ``ResidencyAccount`` (alchemist_sgl/train/offload.py, residency.py).
  * ``peak_train_bytes_offload`` / ``_no_offload``: the account's device-pool peak over one step
    of the same samples from the same adapter and AdamW state (restored between arms): the saved
    tensors of every layer unit plus the layer boundary streams the run holds. Head-chunk
    workspace, the adapter, its gradients and AdamW state are not in these numbers (the same in
    both arms). ``reduction`` = 1 - offload / no_offload. ``losses_equal``: the two arms' losses
    are bitwise equal (offload changes nothing but memory).
  * ``max_tokens_*``: the largest one-sample step (micro-batches are one sample, so a batch's
    device peak is its largest sample's) that runs to its end under a device limit of
    ``device_budget_bytes`` (the no-offload peak at ``budget_tokens``): each try is a real step
    under an account limit that raises when exceeded; doubling, then bisection down to
    ``granularity_tokens``. ``tokens_ratio`` = offload / no_offload.
The trainer runs its default layout (joint), eager, without recordings (``train.replay: false``:
saved tensors are the same with replay, only the base matmuls differ).
``measurement``: ``logical-cpu`` here (the account's own, on CUDA the allocator's pool).
On a model of L layers the offload arm keeps about two layers' saved tensors resident (the one in
backward and the one prefetched), so ``reduction`` is bounded by about 1 - 2/L: the tiny model
(L = 4) cannot show the targets; SmolLM2 (L = 30) is the measured configuration.
``ALCHEMIST_MEMORY_MODEL`` (default smollm2-135m-instruct; ``tiny`` for a smoke run).
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch

NAME = "memory"
QUICK = {"samples": 2, "sample_tokens": 96, "budget_tokens": 96, "granularity_tokens": 16,
         "max_tokens": 1024}
FULL = {"samples": 4, "sample_tokens": 512, "budget_tokens": 512, "granularity_tokens": 32,
        "max_tokens": 8192}
RESPONSE_FRACTION = 0.25  # of a sample's tokens; the rest is the prompt


def run(ctx: Any) -> dict[str, Any]:
    from alchemist_sgl.config import LoraConfig, TrainConfig
    from alchemist_sgl.prepare import resolve_model
    from alchemist_sgl.train import ReplayTrainer, load_fused_weights

    torch.set_num_threads(int(os.environ.get("ALCHEMIST_BENCH_THREADS", "1")))
    p = QUICK if ctx.quick else FULL
    model = os.environ.get("ALCHEMIST_MEMORY_MODEL", "smollm2-135m-instruct")
    folder = resolve_model(model)
    stream = _token_stream(folder, ctx.workload(min_turns=2), p["max_tokens"] * 2)
    weights = load_fused_weights(folder)
    cfg = TrainConfig(lora=LoraConfig(rank=16, alpha=32.0), learning_rate=1e-4, replay=False)
    trainer = ReplayTrainer(weights, cfg, seed=ctx.seed)
    start = copy.deepcopy(trainer.state_dict())
    samples = [_sample(stream, p["sample_tokens"], i) for i in range(p["samples"])]

    arms = {}
    for is_offload in (False, True):
        trainer.load_state_dict(copy.deepcopy(start))
        arms[is_offload] = _step(trainer, samples, is_offload, None)
    trainer.load_state_dict(copy.deepcopy(start))
    (loss_no, account_no), (loss_off, account_off) = arms[False], arms[True]
    peak_no, peak_off = account_no.peak_bytes("device"), account_off.peak_bytes("device")
    if peak_no == 0:
        raise RuntimeError("the account saw nothing: StepRun does not run trainer.residency")

    budget = _step(trainer, [_sample(stream, p["budget_tokens"], 0)], False, None)[1]
    budget_bytes = budget.peak_bytes("device")
    trainer.load_state_dict(copy.deepcopy(start))
    max_tokens = {is_offload: _largest_fit(trainer, stream, is_offload, budget_bytes, p, start)
                  for is_offload in (False, True)}
    return {"measurement": account_off.measurement, "model": model,
            "peak_train_bytes_offload": peak_off, "peak_train_bytes_no_offload": peak_no,
            "reduction": 1.0 - peak_off / peak_no,
            "moved_to_host_bytes": account_off.moved_to_host_bytes,
            "host_peak_bytes_offload": account_off.peak_bytes("host"),
            "losses_equal": loss_no == loss_off,
            "samples": len(samples), "sample_tokens": p["sample_tokens"],
            "device_budget_bytes": budget_bytes, "budget_tokens": p["budget_tokens"],
            "granularity_tokens": p["granularity_tokens"],
            "max_tokens_offload": max_tokens[True], "max_tokens_no_offload": max_tokens[False],
            "tokens_ratio": max_tokens[True] / max_tokens[False] if max_tokens[False] else None,
            "max_tokens_cap": p["max_tokens"],  # a max_tokens_* equal to it: the search hit the cap
            "threads": torch.get_num_threads()}


def _token_stream(folder, conversations, n_tokens: int) -> list[int]:
    """Token ids of the conversations' text (every turn and reply), concatenated, >= n_tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    ids: list[int] = []
    while len(ids) < n_tokens:
        before = len(ids)
        for conv in conversations:
            for text in (*conv.human_turns, *conv.reference_replies):
                ids += tok(text, add_special_tokens=False)["input_ids"]
            if len(ids) >= n_tokens:
                break
        if len(ids) == before:
            raise ValueError("the workload has no text to make training samples from")
    return ids


def _sample(stream: list[int], tokens: int, index: int):
    """A sample of ``tokens`` ids cut from ``stream`` (offset by ``index``): prompt + response."""
    from alchemist_sgl.train import Sample

    if tokens < 4:
        raise ValueError(f"a sample needs at least 4 tokens (got {tokens})")
    start = (index * 997) % max(1, len(stream) - tokens)
    ids = stream[start:start + tokens]
    n_resp = max(1, int(tokens * RESPONSE_FRACTION))
    return Sample(ids[:-n_resp], ids[-n_resp:])


def _step(trainer, samples, is_offload: bool, limit_bytes: int | None):
    """One step (all its work units) with the account; (loss, account). Raises
    DeviceBudgetExceeded when the device pool would pass ``limit_bytes``."""
    from alchemist_sgl.train.offload import SavedTensorOffload
    from alchemist_sgl.train.residency import ResidencyAccount

    account = ResidencyAccount(trainer.weights.device, device_limit_bytes=limit_bytes)
    trainer.residency = SavedTensorOffload(account, is_enabled=is_offload)
    try:
        run = trainer.begin_step(samples)
        while not run.is_done:
            run.run_unit()
        run.finish()
        return run.loss, account
    finally:
        trainer.residency.release_all()
        trainer.residency = None


def _fits(trainer, stream, tokens: int, is_offload: bool, budget: int, start) -> bool:
    from alchemist_sgl.train.residency import DeviceBudgetExceeded

    trainer.load_state_dict(copy.deepcopy(start))
    try:
        _step(trainer, [_sample(stream, tokens, 0)], is_offload, budget)
        return True
    except DeviceBudgetExceeded:
        return False


def _largest_fit(trainer, stream, is_offload: bool, budget: int, p: dict, start) -> int:
    """The largest sample length (a multiple of ``granularity_tokens``, at most ``max_tokens``)
    whose step runs under ``budget``, found by trying: doubling, then bisection."""
    step, cap = p["granularity_tokens"], p["max_tokens"]
    if not _fits(trainer, stream, step, is_offload, budget, start):
        return 0
    lo, hi = step, None
    while hi is None:
        nxt = min(lo * 2, cap)
        if nxt == lo:
            return lo  # fits at the cap: the search is bounded there (reported as is)
        if _fits(trainer, stream, nxt, is_offload, budget, start):
            lo = nxt
        else:
            hi = nxt
    while hi - lo > step:
        mid = (lo + hi) // 2 // step * step
        if mid <= lo:
            break
        if _fits(trainer, stream, mid, is_offload, budget, start):
            lo = mid
        else:
            hi = mid
    return lo
