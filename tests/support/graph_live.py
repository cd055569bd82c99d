"""The ``record.plan: graph`` phase of the live replay test (tests/integration/test_replay_live.py,
tiny case, whose server records the graph plan): the attention output and lse the live server records
equal HF, and the online loop's own training path takes graph replay and equals HF + PEFT.

``serve_graph_phase`` runs against the live server (after the test's fresh-adapter phase): one
warm-up publish, so the served weights are W0 merged with an adapter whose B != 0; training paused;
a cold prompt and its next turn (a radix hit: new rows whose attention runs over cached keys) dumped
by the scheduler (``ALCHEMIST_SGL_RECORD_DUMP_DIR``, see ``Capture._dump``); ``debug.grads``
(online/commands.py) trains the cold sample through the loop's path (store pin, rebuild, work
units). ``check_graph_phase`` then compares, with the server stopped: the reference is HF
transformers + PEFT over the model folder with the trainer's adapter (the published one: the round
is fresh, lag 0); the attention output is o_proj's input (a forward pre-hook); the lse is computed
in fp32 from HF's q and k after RoPE (``apply_rotary_pos_emb`` wrapped), at every recorded position,
within 1e-4. ``debug.grads`` must report graph replay (``graph_samples`` 1, P - 1 rows replayed) and
its loss and LoRA gradients equal HF + PEFT.
"""

from __future__ import annotations

from pathlib import Path

import torch

from alchemist_sgl.train import LoraAdapter, load_fused_weights
from tests.support.hfref import build_hf_peft, hf_grads, max_rel_err
from tests.support.online import (chat, command, dump_files, next_dump, post, status, train_and_wait,
                                  wait_for)
from tests.support.servers import REPO, RunningServer

CONFIG = "configs/cpu-tiny.yaml"
FOLDER = REPO / "var" / "models" / "tiny"
TOL_FP32 = 1e-4
GRAPH = ["qkv", "o", "gate_up", "down", "attn", "lse"]
PROMPT = "Graph capture. " + " ".join(
    f"On day {i} the travellers counted {i + 7} boats near bridge {i * 3}." for i in range(1, 9))


def _chat_with_dump(server: RunningServer, dump: Path,
                    messages: list[dict] | None = None) -> tuple[dict, dict]:
    before = dump_files(dump)
    if messages is None:
        reply = chat(server, PROMPT, max_tokens=8)
    else:
        reply = post(server, "/v1/chat/completions", {"model": server.model, "messages": messages,
                                                      "max_tokens": 8, "temperature": 0})
    return reply, next_dump(dump, before)


def _reference_model(dump: dict) -> torch.nn.Module:
    torch.set_num_threads(1)
    weights = load_fused_weights(FOLDER, dtype=torch.float32)
    adapter = LoraAdapter(weights.spec, rank=dump["rank"], alpha=dump["alpha"])
    adapter.load_peft_state_dict(dump["adapter"])
    return build_hf_peft(FOLDER, torch.float32, adapter)


def _reference_attention(model: torch.nn.Module, tokens: list[int]) -> dict[str, torch.Tensor]:
    """attn [layers, T, q_size] (o_proj's input) and lse [layers, T, heads] fp32 (from q, k)."""
    from transformers.models.llama import modeling_llama

    base = model.get_base_model()
    attn: list[torch.Tensor] = []
    qk: list[tuple[torch.Tensor, torch.Tensor]] = []
    rope = modeling_llama.apply_rotary_pos_emb

    def tapped(q, k, cos, sin, *args, **kwargs):
        out = rope(q, k, cos, sin, *args, **kwargs)
        qk.append((out[0].detach(), out[1].detach()))
        return out

    handles = [layer.self_attn.o_proj.register_forward_pre_hook(
        lambda m, args: attn.append(args[0][0].detach())) for layer in base.model.layers]
    modeling_llama.apply_rotary_pos_emb = tapped
    try:
        with torch.no_grad():
            model(torch.tensor([tokens]))
    finally:
        modeling_llama.apply_rotary_pos_emb = rope
        for handle in handles:
            handle.remove()
    lse = []
    for q, k in qk:  # [1, H, T, d], [1, KV, T, d]
        heads, n, d = q.shape[1:]
        kk = k[0].repeat_interleave(heads // k.shape[1], dim=0).float()
        s = torch.einsum("hid,hjd->hij", q[0].float(), kk) * d ** -0.5
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        lse.append(torch.logsumexp(s, dim=-1).t())
    return {"attn": torch.stack(attn), "lse": torch.stack(lse)}


def serve_graph_phase(server: RunningServer, dump_dir: Path) -> dict:
    """The live part, on a server started with ``record.plan=graph`` (see the module docstring)."""
    s = status(server)
    assert s["record_plan"]["tensors"] == GRAPH and "record" not in s["disabled"]
    assert s["record_plan"]["prompt_forward_flops_avoided"] == 1.0
    train_and_wait(server, [{"prompt": "Warm-up: the river is", "response": " wide and slow.",
                             "rating": "up"}], publishes=1)
    post(server, "/alchemist/train/pause", {})
    wait_for(server, lambda st: st["train"]["state"] == "paused", what="pause")
    reply, record = _chat_with_dump(server, dump_dir)
    out = command(server, "debug.grads", {"sample": {"completion_id": reply["id"],
                                                     "rating": "up"}, "name": "graph.pt"})
    grads = torch.load(out["path"])
    turn2 = [{"role": "user", "content": PROMPT},
             {"role": "assistant", "content": reply["choices"][0]["message"]["content"]},
             {"role": "user", "content": "And what happened on day 3?"}]
    reply2, record2 = _chat_with_dump(server, dump_dir, turn2)
    assert reply2["usage"]["prompt_tokens_details"]["cached_tokens"] >= 16
    assert "record" not in status(server)["disabled"]
    return {"record": record, "record2": record2, "grads": grads}


def check_graph_phase(phase: dict) -> None:
    """The comparisons against HF + PEFT (see the module docstring)."""
    record, record2, grads = phase["record"], phase["record2"], phase["grads"]
    n = len(record["tokens"])
    assert record["covered"] == [(0, n)] and set(record["tensors"]) == set(GRAPH)
    assert grads["prompt_ids"] == record["tokens"]
    assert grads["graph_samples"] == 1 and grads["replayed_tokens"] == n - 1
    model = _reference_model(grads)
    ref = _reference_attention(model, record["tokens"])
    for name in ("attn", "lse"):
        got = record["tensors"][name]
        assert got.dtype == torch.float32 and got.shape == ref[name].shape, name
        torch.testing.assert_close(got, ref[name], rtol=TOL_FP32, atol=TOL_FP32,
                                   msg=lambda m, name=name: f"{name}: {m}")
    ref2 = _reference_attention(model, record2["tokens"])
    positions = torch.cat([torch.arange(a, b) for a, b in record2["covered"]])
    assert record2["covered"][0][0] == 0 and len(positions) > n
    for name in ("attn", "lse"):
        torch.testing.assert_close(record2["tensors"][name], ref2[name][:, positions],
                                   rtol=TOL_FP32, atol=TOL_FP32,
                                   msg=lambda m, name=name: f"next turn {name}: {m}")
    sample = (torch.tensor(grads["prompt_ids"]), torch.tensor(grads["response_ids"]), 1.0)
    ref_loss, ref_grads = hf_grads(model, [sample])
    assert abs(grads["loss"] - ref_loss) <= TOL_FP32 * abs(ref_loss)
    got = {k: v for k, v in grads["grads"].items() if v is not None}
    assert any("lora_A" in k and float(v.norm()) > 0 for k, v in ref_grads.items())
    assert max_rel_err(got, ref_grads) <= TOL_FP32
