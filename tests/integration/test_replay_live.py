"""Replay on recordings captured by the LIVE server gives the gradients of an independent reference.

The chain the product relies on, end to end: a real SGLang server (fp32) records BASE projection
outputs during prefill, stitched across requests by the radix cache (with holes where tokens were
decoded in an earlier turn, never prefilled); the trainer replays them; loss and every LoRA
gradient equal HF transformers + PEFT with the same LoRA tensors (norm-wise relative error, max
over tensors, <= 1e-4). The recordings are read back through the scheduler's test-only dump
(``ALCHEMIST_SGL_RECORD_DUMP_DIR``, see ``Capture._dump``).

The adapter is a fresh one (B = 0, A random), as right after a merge publish: the server serves
exactly the weights the trainer starts from, so the recordings are exact (lag 0). A non-zero
adapter would change every layer's input after the first, and recordings of the plain base would
be stale (alchemist_sgl/train/samples.py, Note [Staleness]). With B = 0 the gradients of A are
exactly zero on both sides and the gradients of B carry the whole comparison.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest
import torch

from alchemist_sgl.config import LoraConfig, TrainConfig
from alchemist_sgl.train import PromptSegment, Recording, ReplayTrainer, Sample, load_fused_weights
from tests.support.servers import REPO, RunningServer, dedicated_server
from alchemist_sgl.train import LoraAdapter
from alchemist_sgl.train.spec import PROJECTIONS
from tests.support.graph_live import check_graph_phase, serve_graph_phase
from tests.support.online import dump_files, next_dump, status
from tests.support.hfref import adapter_grads, build_hf_peft, hf_grads, max_rel_err

TOL_FP32 = 1e-4
SYSTEM = "You are a careful travel assistant. " + " ".join(
    f"Rule {i}: answer about bridge {i} with its colour and its length in metres." for i in range(1, 9))
CASES = {
    # The tiny server records the graph plan (the four projections + attention output and lse),
    # chosen by record.plan auto (graph's ratio set highest, a traffic the pool holds): the
    # projection replay below reads its projections, then tests/support/graph_live.py checks the
    # graph plan on the same server.
    "tiny": ("configs/cpu-tiny.yaml", "tiny", ("record.plan=auto", "record.auto.graph_ratio=2",
                                               "record.auto.prompt_tokens_per_s=10")),
    "smollm2": ("configs/cpu-smollm2.yaml", "smollm2-135m-instruct",
                ("sglang.dtype=float32", "record.budget_bytes_per_token=full")),
}


def _post(server: RunningServer, path: str, body: dict) -> dict:
    req = urllib.request.Request(f"{server.base_url}{path}", data=json.dumps(body).encode(),
                                 method="POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as resp:
        return json.loads(resp.read())


def _chat_and_dump(server: RunningServer, dump: Path, messages: list[dict]) -> tuple[str, dict]:
    before = dump_files(dump)
    reply = _post(server, "/v1/chat/completions", {
        "model": server.model, "messages": messages, "max_tokens": 12, "temperature": 0})
    return reply["choices"][0]["message"]["content"], next_dump(dump, before)


def _served_recordings(server: RunningServer, dump: Path) -> list[dict]:
    """Three prompts: a cold one; its next turn (radix hit over the first turn, a hole where the
    reply was decoded); another user behind the same system prompt (a stitched, unaligned prefix)."""
    first = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Tell me about bridge 3."}]
    reply, cold = _chat_and_dump(server, dump, first)
    second = first + [{"role": "assistant", "content": reply},
                      {"role": "user", "content": "And bridge 5, briefly?"}]
    _, next_turn = _chat_and_dump(server, dump, second)
    other = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Which bridge is longest?"}]
    _, shared = _chat_and_dump(server, dump, other)
    return [cold, next_turn, shared]


def _sample(record: dict, response: torch.Tensor, weight: float) -> Sample:
    """Segments tiling the prompt: covered ranges take their rows of the dumped tensors."""
    tokens = torch.tensor(record["tokens"])
    segments, offset, cursor = [], 0, 0
    for start, end in record["covered"]:
        if start > cursor:
            segments.append(PromptSegment(cursor, start, None))
        rows = {k: v[:, offset:offset + end - start].contiguous() for k, v in record["tensors"].items()
                if k in PROJECTIONS}  # the graph plan's attn and lse are not projection rows
        segments.append(PromptSegment(start, end, Recording(0, rows)))
        offset += end - start
        cursor = end
    if cursor < len(tokens):
        segments.append(PromptSegment(cursor, len(tokens), None))
    return Sample(tokens, response, tuple(segments), weight=weight)


def _check_debug_export(server: RunningServer, record: dict, path: Path) -> None:
    """The ``debug.recording`` control command reads the same recording back from the store."""
    answer = _post(server, "/alchemist/commands/debug.recording",
                   {"tokens": record["tokens"], "name": path.name, "path": "/tmp/elsewhere.pt"})
    assert answer["result"]["covered"] == [list(r) for r in record["covered"]]
    written = (REPO / answer["result"]["path"]).resolve()
    assert written.parent == (REPO / "var" / "debug").resolve(), "debug writes stay under var/"
    exported = torch.load(written)
    rows = {name: torch.cat([t[name] for _, _, t in exported["segments"] if t is not None], dim=1)
            for name in record["tensors"]}
    for name, tensor in record["tensors"].items():
        assert torch.equal(rows[name], tensor), name


def _check_auto_choice(plan: dict) -> None:
    """record.plan auto on the live server: graph first by ratio, and it fits and is not refused."""
    chosen_by = plan["chosen_by"]
    assert plan["tensors"] == [*PROJECTIONS, "attn", "lse"], plan
    assert chosen_by["rule"] == "auto: best measured ratio that holds the rounds", chosen_by
    verdicts = [(c["plan"], c["verdict"]) for c in chosen_by["candidates"]]
    assert verdicts == [("graph", "chosen"), ("full", "fits"), ("down", "fits")], verdicts
    assert chosen_by["round_tokens"] == 10 * 60  # record.auto.prompt_tokens_per_s x train.round_s
    assert chosen_by["candidates"][0]["round_bytes"] == 600 * plan["bytes_per_token"]


@pytest.mark.parametrize("case", ["tiny", pytest.param("smollm2", marks=pytest.mark.slow)])
def test_replay_on_live_recordings_matches_hf_peft(case: str, tmp_path: Path) -> None:
    config, model_name, overrides = CASES[case]
    dump = tmp_path / "dump"
    with dedicated_server(config, ("store.host_bytes=268435456", *overrides),
                          extra_env={"ALCHEMIST_SGL_RECORD_DUMP_DIR": str(dump)}) as server:
        records = _served_recordings(server, dump)
        if case == "tiny":
            _check_auto_choice(status(server)["record_plan"])
            _check_debug_export(server, records[2], tmp_path / "export.pt")
            graph = serve_graph_phase(server, dump)
    if case == "tiny":
        check_graph_phase(graph)

    from transformers import AutoTokenizer

    torch.set_num_threads(1)
    folder = REPO / "var" / "models" / model_name
    tokenizer = AutoTokenizer.from_pretrained(folder)
    responses = [torch.tensor(tokenizer.encode(text, add_special_tokens=False)) for text in (
        "Bridge 3 is red and 40 metres long.", "Bridge 5 is blue.", "Bridge 8 is the longest.")]

    lengths = [len(r["tokens"]) for r in records]
    covered = [sum(b - a for a, b in r["covered"]) for r in records]
    assert covered[0] == lengths[0], "a cold prompt is recorded whole"
    assert 0 < covered[1] < lengths[1], f"the next turn has a hole where the reply was decoded: {records[1]['covered']}"
    assert records[2]["covered"][0][0] == 0 and covered[2] == lengths[2], "the shared prefix is stitched"

    weights = load_fused_weights(folder, dtype=torch.float32)
    adapter = LoraAdapter(weights.spec, rank=4, alpha=8.0, seed=0)  # fresh: B = 0
    peft_model = build_hf_peft(folder, torch.float32, adapter)
    samples = [_sample(r, resp, 1.0 + i) for i, (r, resp) in enumerate(zip(records, responses))]
    ref_loss, ref_grads = hf_grads(peft_model, [(s.prompt_ids, s.response_ids, s.weight) for s in samples])

    trainer = ReplayTrainer(weights, TrainConfig(lora=LoraConfig(rank=adapter.rank, alpha=adapter.alpha)))
    trainer.adapter = adapter
    adapter.zero_grad(set_to_none=True)
    loss, counts, _ = trainer.accumulate(samples)
    grads = adapter_grads(adapter)

    assert counts.replayed_tokens == sum(covered)
    assert counts.recomputed_tokens >= lengths[1] - covered[1]
    assert abs(loss - ref_loss) <= TOL_FP32 * abs(ref_loss), (loss, ref_loss)
    b_ref = {k: v for k, v in ref_grads.items() if "lora_B" in k}
    a_ref = {k: v for k, v in ref_grads.items() if "lora_A" in k}
    assert b_ref and all(float(v.norm()) > 0 for v in b_ref.values())
    assert all(float(v.norm()) == 0 for v in a_ref.values())
    assert all(grads[k] is None or float(grads[k].norm()) == 0 for k in a_ref)
    assert max_rel_err(grads, b_ref) <= TOL_FP32
