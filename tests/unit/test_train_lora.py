"""LoRA layout (PEFT-compatible names and shapes over the fused base), the publish merge against
PEFT's ``merge_and_unload``, and the trainer API."""

from __future__ import annotations

import copy

import pytest
import torch

from alchemist_sgl.config import LoraConfig, TrainConfig
from alchemist_sgl.online.publish import MasterWeights, merged_tensor
from alchemist_sgl.train import BaseWeights, LoraAdapter, ReplayTrainer, Sample, load_fused_weights
from alchemist_sgl.train.spec import TARGET_TO_PROJECTION, layer_key
from tests.support.hfref import build_hf_peft, model_dir, random_adapter


@pytest.fixture(scope="module")
def weights():
    return load_fused_weights(model_dir("tiny"))


def test_adapter_names_and_shapes_match_peft(weights):
    from peft import get_peft_model_state_dict
    adapter = random_adapter(weights.spec, rank=4)
    peft_model = build_hf_peft(model_dir("tiny"), torch.float32, adapter)
    theirs = get_peft_model_state_dict(peft_model)
    ours = adapter.peft_state_dict()
    assert set(ours) == set(theirs)
    for k, v in theirs.items():
        assert ours[k].shape == v.shape, k
        torch.testing.assert_close(ours[k], v)
    cfg = adapter.peft_config_dict()
    assert cfg["r"] == 4 and sorted(cfg["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


def test_fresh_adapter_is_identity_and_targets_are_configurable(weights):
    spec = weights.spec
    adapter = LoraAdapter(spec, rank=8, targets=("down", "q"))
    assert adapter.targets == ("q", "down")  # canonical order
    assert all(float(b.detach().abs().sum()) == 0.0 for b in adapter.b.values())
    assert adapter.a["0_q"].shape == (8, spec.hidden) and adapter.b["0_q"].shape == (spec.q_size, 8)
    assert adapter.a["0_down"].shape == (8, spec.intermediate)
    with pytest.raises(ValueError):
        LoraAdapter(spec, targets=("qkv",))


def _peft_merged(adapter, w0: BaseWeights) -> dict[str, torch.Tensor]:
    """PEFT's own merge (``merge_and_unload``, fp32) of ``adapter`` over the base tensors ``w0``
    (upcast to fp32 and copied into the HF modules), keyed by HF parameter name."""
    peft_model = build_hf_peft(model_dir("tiny"), torch.float32, adapter)
    spec = w0.spec
    with torch.no_grad():
        for lw, layer in zip(w0.layers, peft_model.base_model.model.model.layers):
            for t, (parent, name) in {"q": ("self_attn", "q_proj"), "k": ("self_attn", "k_proj"),
                                      "v": ("self_attn", "v_proj"), "o": ("self_attn", "o_proj"),
                                      "gate": ("mlp", "gate_proj"), "up": ("mlp", "up_proj"),
                                      "down": ("mlp", "down_proj")}.items():
                start, end = spec.target_rows(t)
                proj = TARGET_TO_PROJECTION[t]
                getattr(getattr(layer, parent), name).base_layer.weight.copy_(
                    lw.projection(proj)[start:end].float())
    return peft_model.merge_and_unload().state_dict()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_publish_merge_matches_peft_merge_and_unload(dtype):
    """online/publish.py's ``merged_tensor`` (the one merge the server publishes with) against
    PEFT's ``merge_and_unload`` over the same W0 and adapter: fp32 to rounding; bf16 equals PEFT's
    fp32 merge cast once to bf16 (Note [Rebuild from the master]: fp32 arithmetic, one cast)."""
    w0 = load_fused_weights(model_dir("tiny"), dtype)
    spec = w0.spec
    adapter = random_adapter(spec, rank=4)
    frozen = adapter.snapshot()
    theirs = _peft_merged(adapter, w0)
    changed = 0
    for i, lw in enumerate(w0.layers):
        pre = f"model.layers.{i}."
        want = {"qkv": torch.cat([theirs[pre + f"self_attn.{n}_proj.weight"] for n in "qkv"]),
                "o": theirs[pre + "self_attn.o_proj.weight"],
                "gate_up": torch.cat([theirs[pre + f"mlp.{n}_proj.weight"] for n in ("gate", "up")]),
                "down": theirs[pre + "mlp.down_proj.weight"]}
        for proj, ref in want.items():
            ours = merged_tensor(lw.projection(proj), frozen.pairs(i, proj), frozen.scale, spec)
            assert ours.dtype == dtype and ours.shape == lw.projection(proj).shape
            if dtype == torch.float32:
                torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
            else:
                # One bf16 rounding of the same fp32 sum; the two fp32 sums may differ in their
                # last bit (matmul order), so a rare element may round one bf16 step apart.
                ref16 = ref.to(torch.bfloat16)
                torch.testing.assert_close(ours, ref16, rtol=2 ** -7, atol=0)
                assert (ours != ref16).float().mean() < 1e-3, proj
            changed += int((ours != lw.projection(proj)).sum())
    assert changed > 0, "the adapter changed no served weight"


def _sample(seed: int, p: int = 20, r: int = 6, **kw) -> Sample:
    g = torch.Generator().manual_seed(seed)
    return Sample(torch.randint(10, 40000, (p,), generator=g),
                  torch.randint(10, 40000, (r,), generator=g), **kw)


def test_trainer_step_learns_counts_and_publishes_without_reset():
    weights = load_fused_weights(model_dir("tiny"))  # own copy: the publish merges into it
    cfg = TrainConfig(lora=LoraConfig(rank=4, alpha=8.0), learning_rate=5e-3)
    trainer = ReplayTrainer(weights, cfg)
    sample = _sample(1)
    trainer.version = 3  # the caller's version; the trainer never advances it
    first = trainer.step([sample])
    for _ in range(5):
        last = trainer.step([sample])
    assert last.loss < first.loss
    assert trainer.version == 3 and last.version == 3
    assert trainer.counters.steps == 6 and trainer.counters.tokens_trained == 6 * 26
    assert trainer.counters.recomputed_tokens == 6 * 20 and trainer.counters.replayed_tokens == 0
    status = trainer.status()
    assert status["samples_trained"] == 6 and status["loss_ema"] is not None
    assert status["nonfinite_skipped"] == 0
    planned = trainer.plan(sample)
    adam_steps = {k: float(v["step"]) for k, v in trainer.optimizer.state_dict()["state"].items()}
    with torch.no_grad():
        before = trainer.logprobs(planned)
        frozen = trainer.adapter.snapshot()
        master = MasterWeights(trainer.weights, frozen.targets)
        for i, lw in enumerate(trainer.weights.layers):  # the publish: W_pub = cast(W0 + s*B@A)
            for proj, w in master.tensors[i].items():
                lw.projection(proj).copy_(merged_tensor(w, frozen.pairs(i, proj), frozen.scale,
                                                        trainer.weights.spec))
        trainer.set_published(frozen)
        assert trainer.is_published_current
        after = trainer.logprobs(planned)
        served = trainer.logprobs(planned, is_adapter_enabled=False)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(served, before, rtol=1e-4, atol=1e-4)
    # The adapter and AdamW state carry on across the publish (docs/online-loop.md "One version").
    assert any(float(b.detach().abs().sum()) > 0 for b in trainer.adapter.b.values())
    assert {k: float(v["step"]) for k, v in trainer.optimizer.state_dict()["state"].items()} == adam_steps
    assert not hasattr(trainer, "merge_into_base")
    trainer.step([sample])
    assert not trainer.is_published_current and trainer.version == 3


@pytest.mark.parametrize("objective", ["unlikelihood", "kto"])
def test_negative_objectives_lower_the_response_likelihood(objective):
    weights = load_fused_weights(model_dir("tiny"))
    cfg = TrainConfig(lora=LoraConfig(rank=4, alpha=8.0), learning_rate=5e-3,
                      objective_negative=objective)
    trainer = ReplayTrainer(weights, cfg)
    neg = _sample(2, kind="negative")
    planned = trainer.plan(neg)
    with torch.no_grad():
        start = float(trainer.logprobs(planned).sum())
    for _ in range(4):
        stats = trainer.step([neg, _sample(3)])
    with torch.no_grad():
        end = float(trainer.logprobs(planned).sum())
    assert end < start, (start, end)
    assert stats.samples == 2


def test_kto_uses_given_reference_logprobs():
    from alchemist_sgl.train.objectives import kto_negative_loss, sample_loss
    logp = torch.tensor([-1.0, -2.0])
    ref = torch.tensor([-1.5, -2.5])  # the policy is 1 nat above the reference: loss > 0.5
    assert float(kto_negative_loss(logp, ref, 0.0)) > 0.5
    assert float(kto_negative_loss(logp, logp, 0.0)) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="reference"):
        sample_loss("negative", "kto", logp, None)


def test_adapter_on_base_weights_by_reference_no_copy():
    weights = load_fused_weights(model_dir("tiny"))
    tensors = {layer_key(i, p): getattr(lw, p) for i, lw in enumerate(weights.layers)
               for p in ("qkv", "o", "gate_up", "down", "input_layernorm", "post_attention_layernorm")}
    tensors |= {"model.embed_tokens.weight": torch.nn.Parameter(weights.embed, requires_grad=False),
                "model.norm.weight": weights.final_norm}
    wrapped = BaseWeights.from_tensors(weights.spec, tensors)
    assert wrapped.layers[3].down.data_ptr() == weights.layers[3].down.data_ptr()
    assert wrapped.embed.data_ptr() == weights.embed.data_ptr() and wrapped.lm_head is wrapped.embed
    with pytest.raises(KeyError, match="norm"):
        BaseWeights.from_tensors(weights.spec, {k: v for k, v in tensors.items() if k != "model.norm.weight"})


def test_unit_step_equals_whole_sample_step_and_state_round_trips():
    weights = load_fused_weights(model_dir("tiny"))
    cfg = TrainConfig(lora=LoraConfig(rank=4, alpha=8.0), learning_rate=5e-3, loss_chunk_rows=2)
    whole, sliced = ReplayTrainer(weights, cfg, layout="joint"), ReplayTrainer(weights, cfg)
    batch = [_sample(5, weight=0.5), _sample(6, p=11, r=3, weight=2.0)]
    a = whole.step(batch)  # the joint layout runs whole samples
    run = sliced.begin_step(batch)
    with pytest.raises(RuntimeError, match="not run"):
        run.finish()
    units_run = 0
    while not run.is_done:
        run.run_unit()
        units_run += 1
    with pytest.raises(RuntimeError, match="all units"):
        run.run_unit()
    b = run.finish()
    assert a.loss == pytest.approx(b.loss, rel=1e-6) and b.max_unit_ms <= b.step_ms
    # Counted by running them, against the hand count for the tiny model (4 layers): per sample
    # 4 forward + 4 backward layer units (16), head units of loss_chunk_rows=2 over responses of
    # 6 and 3 rows (3 + 2), and the optimizer's (1): 22.
    assert weights.spec.layers == 4
    assert units_run == b.units == run.units_total == 22
    for k, v in whole.adapter.state_dict().items():
        # AdamW normalises: a 1e-7 gradient difference on a tiny element moves it by ~1e-6.
        torch.testing.assert_close(sliced.adapter.state_dict()[k], v, rtol=1e-5, atol=1e-5)
    sliced.version = 4
    sliced.set_published(sliced.adapter.snapshot())
    restored = ReplayTrainer(weights, cfg)
    restored.load_state_dict(copy.deepcopy(sliced.state_dict()))  # state_dict holds references
    assert restored.version == 4 and restored.counters.steps == 1
    assert restored.is_published_current and restored.published.equals(sliced.published)
    assert sliced.step(batch).loss == pytest.approx(restored.step(batch).loss, rel=1e-6)
    for k, v in sliced.adapter.state_dict().items():
        torch.testing.assert_close(restored.adapter.state_dict()[k], v, rtol=0, atol=0)


def test_inference_tensors_are_refused_with_their_name():
    weights = load_fused_weights(model_dir("tiny"))
    tensors = {layer_key(i, p): getattr(lw, p) for i, lw in enumerate(weights.layers)
               for p in ("qkv", "o", "gate_up", "down", "input_layernorm", "post_attention_layernorm")}
    tensors |= {"model.embed_tokens.weight": weights.embed, "model.norm.weight": weights.final_norm}
    with torch.inference_mode():
        tensors[layer_key(2, "down")] = weights.layers[2].down.clone()
    with pytest.raises(ValueError, match="model.layers.2.mlp.down_proj.weight"):
        BaseWeights.from_tensors(weights.spec, tensors)
