"""A rig for the online loop over the real tiny Llama weights, without SGLang, and its checks.

Owns ``Rig`` (a loop built by ``runtime.build_loop`` from ``configs/cpu-tiny.yaml`` over its
own fp32 copy of W0, with ``FakeHost``, a fake clock and byte-level ``tokenize``), the tensor
snapshots tests compare (live weights, adapter, AdamW state), and ``expected_merge``: the served
weights a version must hold, W0 + s * B @ A per LoRA target, written out independently of
``online/publish.py`` (row blocks from the HF config, scale from the LoRA config).
Imports torch and the package's composition root (``build_loop``); never sglang.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from alchemist_sgl.config import load_config
from alchemist_sgl.feedback.completion_log import SqliteCompletionLog
from alchemist_sgl.feedback.ratings import FeedbackStore
from alchemist_sgl.runtime import build_loop
from alchemist_sgl.train import load_fused_weights
from tests.support.hfref import model_dir

REPO = Path(__file__).resolve().parents[2]
TINY_CONFIG = REPO / "configs" / "cpu-tiny.yaml"
EOS = 2
BIG_MS = 600_000.0   # a slice budget no test reaches: run until the loop has no work
TINY_MS = 0.001      # a slice budget every unit overruns: one unit per slice at most


def tokenize(text: str) -> list[int]:
    """Byte-level ids 3..258 (< the tiny vocab), deterministic."""
    return [3 + b for b in text.encode("utf-8")]


def chat(messages: list[dict[str, str]]) -> list[int]:
    return tokenize("\n".join(m["content"] for m in messages))


class FakeHost:
    """``ServingHost``: records ``announce`` calls; ``is_open`` answers ``can_publish``."""

    def __init__(self) -> None:
        self.announced: list[str] = []
        self.is_open = True

    def can_publish(self) -> bool:
        return self.is_open

    def announce(self, version: str) -> None:
        self.announced.append(version)


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Rig:
    """One loop over its own copy of W0, with its host, clock and admission."""

    def __init__(self, folder: Path, overrides: tuple[str, ...] = (), *,
                 feedback: FeedbackStore | None = None,
                 completions: SqliteCompletionLog | None = None,
                 inject_nonfinite_steps: frozenset[int] = frozenset()) -> None:
        self.config = load_config(TINY_CONFIG, [f"train.checkpoint_dir={folder}",
                                                "publish.gate.enabled=false", *overrides])
        self.weights = load_fused_weights(model_dir("tiny"), torch.float32)
        self.w0 = live_tensors(self.weights)
        self.host, self.clock = FakeHost(), FakeClock()
        self.training = build_loop(
            config=self.config, weights=self.weights, host=self.host, recordings=None,
            completions=completions, model_name="tiny", tokenize=tokenize, chat=chat, eos_id=EOS,
            max_tokens=512, serving=lambda: self.loop.registry.serving.name, feedback=feedback,
            inject_nonfinite_steps=inject_nonfinite_steps, clock=self.clock)
        self.loop, self.admission = self.training.loop, self.training.admission

    def feed(self, *pairs: tuple[str, str]) -> None:
        pending = self.admission.admit([{"prompt": p, "response": r, "rating": "up"}
                                        for p, r in pairs])
        assert self.loop.queue.offer(pending) == len(pairs)

    def run_idle(self) -> None:
        """Slices until the loop has no work (or waits for the host)."""
        for _ in range(50):
            if self.loop.run_slice(BIG_MS).units == 0:
                return
        raise AssertionError("the loop never went idle")

    def live(self) -> dict[tuple[int, str], torch.Tensor]:
        return live_tensors(self.weights)

    def expected_live(self) -> dict[tuple[int, str], torch.Tensor]:
        """W0 + s * B @ A of the trainer's current adapter, written out here (``expected_merge``)
        over the test's own copy of W0, with s = lora.alpha / lora.rank from the config."""
        lora = self.config.train.lora
        return expected_merge(self.w0, adapter_state(self.loop), lora.alpha / lora.rank,
                              model_dir("tiny") / "config.json")

    def status(self) -> dict:
        return self.loop.status()


def live_tensors(weights) -> dict[tuple[int, str], torch.Tensor]:
    return {(i, p): lw.projection(p).detach().clone() for i, lw in enumerate(weights.layers)
            for p in ("qkv", "o", "gate_up", "down")}


def same(a: dict, b: dict) -> bool:
    assert a.keys() == b.keys()
    return all(torch.equal(a[k], b[k]) for k in a)


def adapter_state(loop) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in loop.trainer.adapter.peft_state_dict().items()}


def adam_state(loop) -> list[dict[str, torch.Tensor]]:
    opt = loop.trainer.optimizer
    return [{k: v.clone() for k, v in opt.state[p].items()}
            for group in opt.param_groups for p in group["params"] if p in opt.state]


def same_adam(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


def checkpoint_now(loop) -> None:
    """A checkpoint that is on disk when this returns (the loop may write it in the background)."""
    loop.checkpoint()
    writer = getattr(loop, "writer", None)
    if writer is not None:
        writer.flush()


def b_norm(loop) -> float:
    return float(sum(p.detach().abs().sum() for p in loop.trainer.adapter.b.values()))


# Memory-yield runs: offload on, one unit per slice; two short (prompt, response) pairs.
OFFLOAD = ("memory.offload=true", "train.slice_budget_ms=0.001", "train.idle_slice_ms=0.001")
PAIRS = (("Name a colour.", " Ultramarine."), ("Count to three.", " One, two, three."))

SAMPLES = [("Hi there", "Hello!"), ("2+2=", "4"), ("Name a color", "Blue"),
           ("Say yes", "Yes"), ("Count", "1 2 3")]


# The HF modules of each fused projection, in SGLang's row order, and their PEFT names.
_FUSED_MODULES = {"qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                  "o": ("self_attn.o_proj",), "gate_up": ("mlp.gate_proj", "mlp.up_proj"),
                  "down": ("mlp.down_proj",)}


def _module_rows(hf_config: dict) -> dict[str, int]:
    """Output rows of each HF module, from the HF config alone."""
    head_dim = hf_config.get("head_dim") or hf_config["hidden_size"] // hf_config["num_attention_heads"]
    q, kv = hf_config["num_attention_heads"] * head_dim, hf_config["num_key_value_heads"] * head_dim
    hidden, inter = hf_config["hidden_size"], hf_config["intermediate_size"]
    return {"self_attn.q_proj": q, "self_attn.k_proj": kv, "self_attn.v_proj": kv,
            "self_attn.o_proj": hidden, "mlp.gate_proj": inter, "mlp.up_proj": inter,
            "mlp.down_proj": hidden}


def expected_merge(w0: dict[tuple[int, str], torch.Tensor], peft_state: dict[str, torch.Tensor],
                   scale: float, hf_config_path: Path) -> dict[tuple[int, str], torch.Tensor]:
    """The served weights of an adapter: per fused projection [out, in], the row block of each HF
    module is ``cast(W0_block + scale * B @ A)`` (fp32 arithmetic, cast to W0's dtype), or W0's
    block where the adapter has no pair for that module. ``peft_state``: PEFT names
    (``base_model.model.model.layers.{i}.{module}.lora_A.weight``)."""
    rows = _module_rows(json.loads(Path(hf_config_path).read_text()))
    out = {}
    for (layer, proj), w in w0.items():
        blocks, start = [], 0
        for module in _FUSED_MODULES[proj]:
            block = w[start:start + rows[module]].float()
            start += rows[module]
            key = f"base_model.model.model.layers.{layer}.{module}.lora_"
            if key + "A.weight" in peft_state:
                a, b = peft_state[key + "A.weight"].float(), peft_state[key + "B.weight"].float()
                block = block + scale * (b @ a)
            blocks.append(block)
        assert start == w.shape[0], (layer, proj, start, w.shape)
        out[(layer, proj)] = torch.cat(blocks).to(w.dtype)
    return out
