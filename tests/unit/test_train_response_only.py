"""Response-only gradients (forward.py, Note [Response-only gradients]) against an independent
reference: HF transformers + PEFT with a KV cache.

The reference builds ``past_key_values`` from prompt[:P - 1] under ``torch.no_grad()`` (the
adapter on), then runs [prompt[P - 1]] + response WITH grad on that cache and takes the SFT loss
over the response tokens. Loss and every LoRA gradient of the trainer in response-only mode must
match it (fp32, norm-wise relative error <= 1e-4), with and without replay. The planning that
makes the boundary at P - 1 is checked directly, and the response-only gradient is measured
against the exact one (cosine, relative norm; printed, see ``-s``).
"""

from __future__ import annotations

import pytest
import torch

from alchemist_sgl.config import LoraConfig, TrainConfig
from alchemist_sgl.train import ReplayTrainer, Sample, forward_logprobs, load_fused_weights
from alchemist_sgl.train.samples import plan_sample
from tests.support.hfref import (adapter_grads, build_hf_peft, covered_sample, hf_grads,
                                 hf_record, max_rel_err, model_dir, random_adapter)
from tests.support.hfref import ids_of, tiny  # noqa: F401 (``tiny``: a fixture)

TOL_FP32 = 1e-4


def hf_response_only_logprobs(peft_model, prompt: torch.Tensor, response: torch.Tensor) -> torch.Tensor:
    """Log-probs [R] with prompt[:P - 1]'s K/V as constants: a no-grad prefill into a cache, then
    [prompt[P - 1]] + response with grad on top of it."""
    p = prompt.numel()
    cache = None
    if p > 1:
        with torch.no_grad():
            cache = peft_model(input_ids=prompt[:p - 1].view(1, -1), use_cache=True).past_key_values
    ids = torch.cat([prompt[p - 1:], response]).view(1, -1)
    logits = peft_model(input_ids=ids, past_key_values=cache, use_cache=True).logits[0].float()
    return -torch.nn.functional.cross_entropy(logits[:-1], response, reduction="none")


def hf_response_only_grads(peft_model, samples: list[tuple[torch.Tensor, torch.Tensor, float]]):
    """The trainer's SFT objective (as ``hf_grads``) over ``hf_response_only_logprobs``."""
    peft_model.zero_grad(set_to_none=True)
    mean_w = sum(w for _, _, w in samples) / len(samples)
    total = 0.0
    for prompt, response, w in samples:
        loss = -hf_response_only_logprobs(peft_model, prompt, response).mean() * (
            w / mean_w / len(samples))
        loss.backward()
        total += float(loss.detach())
    grads = {k.replace(".default.weight", ".weight"): p.grad.detach().clone()
             for k, p in peft_model.named_parameters() if p.grad is not None}
    return total, grads


def _trainer(weights, adapter, **train_kw) -> ReplayTrainer:
    cfg = TrainConfig(lora=LoraConfig(rank=adapter.rank, alpha=adapter.alpha), **train_kw)
    trainer = ReplayTrainer(weights, cfg)
    trainer.adapter = adapter
    return trainer


def _ours(trainer: ReplayTrainer, samples: list[Sample]):
    trainer.adapter.zero_grad(set_to_none=True)
    loss, counts, _ = trainer.accumulate(samples)
    return loss, {k: v.clone() for k, v in adapter_grads(trainer.adapter).items()
                  if v is not None}, counts


CASES = {
    # name: list of (prompt_len, response_len, ranges as (start, end, is_covered))
    "covered_last_row": [(40, 9, [(0, 40, True)]), (5, 3, [(0, 5, True)])],
    "uncovered_last_row": [(50, 10, [(0, 32, True), (32, 50, False)])],
    "hole_in_middle": [(60, 11, [(0, 20, True), (20, 35, False), (35, 60, True)])],
    "zero_coverage": [(30, 8, [(0, 30, False)])],
    "last_row_alone_covered": [(24, 6, [(0, 23, False), (23, 24, True)])],
    "last_row_alone_uncovered": [(24, 6, [(0, 23, True), (23, 24, False)])],
    "short_prompts": [(1, 4, [(0, 1, True)]), (2, 5, [(0, 2, True)]), (1, 3, [(0, 1, False)])],
    "one_response_token": [(33, 1, [(0, 33, True)])],
}


def _build(case, peft_model, seed0=0):
    samples, ref = [], []
    for j, (p, r, ranges) in enumerate(case):
        prompt, response = ids_of(seed0 + 2 * j, p), ids_of(seed0 + 2 * j + 1, r)
        rec = hf_record(peft_model, prompt)
        samples.append(covered_sample(prompt, response, ranges, rec, weight=1.0 + j))
        ref.append((prompt, response, 1.0 + j))
    return samples, ref


@pytest.mark.parametrize("name", sorted(CASES))
def test_response_only_matches_hf_kv_cache_reference_fp32(tiny, name):
    weights, adapter, peft_model = tiny
    samples, ref = _build(CASES[name], peft_model)
    ref_loss, ref_grads = hf_response_only_grads(peft_model, ref)
    exact_loss, _ = hf_grads(peft_model, ref)
    assert abs(ref_loss - exact_loss) <= TOL_FP32 * abs(exact_loss)  # same forward, other grads
    covered = sum(e - s for (_, _, ranges) in CASES[name] for s, e, c in ranges if c)
    for replay in (True, False):
        trainer = _trainer(weights, adapter, gradient_mode="response_only", replay=replay)
        loss, grads, counts = _ours(trainer, samples)
        assert abs(loss - ref_loss) <= TOL_FP32 * abs(ref_loss), (replay, loss, ref_loss)
        assert max_rel_err(grads, ref_grads) <= TOL_FP32, replay
        assert counts.replayed_tokens == (covered if replay else 0)


def test_first_response_token_gets_its_gradient(tiny):
    """A one-token response: its only label row is P - 1, the prompt's last position. Every LoRA
    tensor gets a non-zero gradient, equal to the reference's; and in a longer response the first
    token's term is what separates the loss over all tokens from the loss over the rest."""
    weights, adapter, peft_model = tiny
    prompt, response = ids_of(7, 33), ids_of(8, 6)
    rec = hf_record(peft_model, prompt)
    one = covered_sample(prompt, response[:1], [(0, 33, True)], rec)
    _, ref_grads = hf_response_only_grads(peft_model, [(prompt, response[:1], 1.0)])
    _, grads, _ = _ours(_trainer(weights, adapter, gradient_mode="response_only"), [one])
    assert set(grads) == set(ref_grads)
    assert all(float(g.norm()) > 0.0 for g in grads.values())
    assert max_rel_err(grads, ref_grads) <= TOL_FP32

    # Through the forward directly: the grad of log p(first token) alone, vs. the reference's.
    trainer = _trainer(weights, adapter, gradient_mode="response_only")
    planned = trainer.plan(covered_sample(prompt, response, [(0, 33, True)], rec))
    adapter.zero_grad(set_to_none=True)
    with torch.enable_grad():
        lp = forward_logprobs(weights, adapter, trainer.rope, planned, gradient_mode="response_only")
        lp[0].backward()
    first = {k: v.clone() for k, v in adapter_grads(adapter).items()}
    peft_model.zero_grad(set_to_none=True)
    hf_response_only_logprobs(peft_model, prompt, response)[0].backward()
    hf_first = {k.replace(".default.weight", ".weight"): p.grad for k, p in
                peft_model.named_parameters() if p.grad is not None}
    assert max_rel_err(first, hf_first) <= TOL_FP32
    assert min(float(g.norm()) for g in first.values()) > 0.0


def test_planning_puts_a_boundary_at_the_prompts_last_row(tiny):
    weights, _, peft_model = tiny
    spec = weights.spec
    prompt, response = ids_of(1, 20), ids_of(2, 5)
    rec = hf_record(peft_model, prompt)

    def plan(ranges, separate):
        return plan_sample(covered_sample(prompt, response, ranges, rec), spec, version=0,
                           max_version_lag=0, is_replay_enabled=True, dtype=torch.float32,
                           is_response_separate=separate)

    def layout(planned):
        return [(s.start, s.end, bool(s.replay)) for s in planned.segments]

    full = [(0, 20, True)]
    assert layout(plan(full, True)) == [(0, 19, True), (19, 20, True), (20, 25, False)]
    assert layout(plan(full, False)) == [(0, 20, True), (20, 25, False)]
    tail = [(0, 12, True), (12, 20, False)]
    assert layout(plan(tail, True)) == [(0, 12, True), (12, 19, False), (19, 25, False)]
    assert layout(plan(tail, False)) == [(0, 12, True), (12, 25, False)]
    alone = [(0, 19, False), (19, 20, True)]
    assert layout(plan(alone, True)) == [(0, 19, False), (19, 20, True), (20, 25, False)]
    # The split recording keeps its rows: row 19 of the one-row segment is the recorded row 19.
    planned = plan(full, True)
    for name, t in rec.items():
        torch.testing.assert_close(planned.segments[0].replay[name], t[:, :19], rtol=0, atol=0)
        torch.testing.assert_close(planned.segments[1].replay[name], t[:, 19:20], rtol=0, atol=0)
    assert plan(full, True).counts == plan(full, False).counts


def test_response_only_refuses_a_plan_without_the_boundary(tiny):
    weights, adapter, _ = tiny
    trainer = _trainer(weights, adapter)  # exact mode: merged [0, P + R) segment
    planned = trainer.plan(Sample(ids_of(3, 12), ids_of(4, 4)))
    with pytest.raises(ValueError, match="boundary at P - 1"):
        forward_logprobs(weights, adapter, trainer.rope, planned, gradient_mode="response_only")


def _chat_samples(folder) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(folder)
    chats = [
        ([{"role": "system", "content": "You are a concise assistant."},
          {"role": "user", "content": "What is the capital of France, and what river runs "
                                      "through it?"}],
         "The capital of France is Paris. The Seine runs through it."),
        ([{"role": "user", "content": "Write a Python one-liner that reverses a string s."}],
         "You can use slicing: s[::-1] returns the string reversed."),
    ]
    out = []
    for messages, answer in chats:
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                         return_dict=False)
        response = tok(answer + tok.eos_token, add_special_tokens=False)["input_ids"]
        out.append((torch.tensor(prompt, dtype=torch.long), torch.tensor(response, dtype=torch.long)))
    return out


def _flat(grads: dict[str, torch.Tensor], keys) -> torch.Tensor:
    return torch.cat([grads[k].double().reshape(-1) for k in keys])


def _measure_against_exact(name: str, rank: int) -> tuple[float, float]:
    """(cosine, ||g_ro|| / ||g_exact||) of the LoRA gradient over 2 chat-like samples, fp32, both
    modes by the trainer; response-only is also checked against the HF KV-cache reference."""
    folder = model_dir(name)
    weights = load_fused_weights(folder)
    adapter = random_adapter(weights.spec, rank=rank)
    peft_model = build_hf_peft(folder, torch.float32, adapter)
    pairs = _chat_samples(folder)
    samples = [covered_sample(p, r, [(0, p.numel(), True)], hf_record(peft_model, p)) for p, r in pairs]
    loss_x, g_exact, _ = _ours(_trainer(weights, adapter), samples)
    loss_r, g_ro, _ = _ours(_trainer(weights, adapter, gradient_mode="response_only"), samples)
    _, ref_ro = hf_response_only_grads(peft_model, [(p, r, 1.0) for p, r in pairs])
    assert abs(loss_r - loss_x) <= TOL_FP32 * abs(loss_x)
    assert max_rel_err(g_ro, ref_ro) <= TOL_FP32
    keys = sorted(g_exact)
    a, b = _flat(g_ro, keys), _flat(g_exact, keys)
    cos, rel = float(a @ b / (a.norm() * b.norm())), float(a.norm() / b.norm())
    print(f"\nresponse_only vs exact, {name}, fp32, r={rank}, prompts "
          f"{[p.numel() for p, _ in pairs]} responses {[r.numel() for _, r in pairs]}: "
          f"cosine {cos:.4f}, norm ratio {rel:.4f}, rel diff {float((a - b).norm() / b.norm()):.4f}")
    return cos, rel


def test_response_only_vs_exact_gradient_tiny():
    cos, _ = _measure_against_exact("tiny", rank=4)
    assert cos < 1.0 - 1e-6  # an approximation: the prompt path is really dropped


@pytest.mark.slow
def test_response_only_vs_exact_gradient_smollm2():
    cos, _ = _measure_against_exact("smollm2-135m-instruct", rank=8)
    assert cos < 1.0 - 1e-6
