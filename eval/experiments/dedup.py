"""dedup: activation-store bytes with prefix dedup (radix cache + shared pages) vs without.

Two servers from ``--config`` (default SmolLM2 on CPU; use ``configs/cpu-smollm2-fp32.yaml`` on a
CPU without bf16 matrix units), one after the other, each stopped before the next starts:
``with`` is the server as configured (radix cache on, ``store.dedup: true``); ``without`` adds
``sglang.disable-radix-cache=true`` and ``store.dedup=false``, so every request prefills and
stores its whole prompt as its own pages. Both: ``train.enabled=false`` (nothing trains, nothing is
released at a publish), ``record.plan=down`` (one tensor per token: the ratio does not depend on
the plan, since every page holds the same tensors and nothing is demoted, and the without arm of
the full run then fits in a 2 GiB host pool, ``store.host_bytes`` in both arms; bytes of another
plan scale by its ``bytes_per_token``), ``server.enable_debug_commands=true`` (coverage is read
back per prompt). ``--quick``: 3 conversations of 3 turns and 8 shared-prompt requests of <= 24
new tokens (~3 minutes on 2 cores with fp32); the full run: 8 x 4 and 16, <= 32 new tokens.

Workloads (packaged chitchat conversations, or ``--dataset-path``), sent one request at a time,
greedy, to ``/v1/completions`` as token ids: ``multi_turn``: several conversations turn by turn,
each turn's prompt the whole conversation so far with the server's own replies; and
``shared_system_prompt``: single-turn requests (the first user turn of other conversations)
behind one long system prompt (instructions and a chat transcript, ``SYSTEM_WORDS`` words). The
token ids come from the model's tokenizer and its chat template applied here (as SGLang's chat
route applies it), and the server prefills exactly those ids. The ``with`` arm builds the stream
(its replies go into later turns); the ``without`` arm sends the very same id lists in the same
order, so both servers store the same prompts. The radix cache is flushed between workloads.

Fields, per workload (``multi_turn``, ``shared_system_prompt``): ``bytes_with_dedup``,
``bytes_without_dedup`` (growth of ``store.bytes_stored`` over the workload), ``ratio`` (without
/ with), ``ideal_ratio`` (prompt tokens sent / unique prompt tokens: positions of the prefix tree of
all the workload's prompts, ``unique_prefix_tokens``), ``coverage_with_dedup``,
``coverage_without_dedup`` (share of the prompt tokens sent that have a recording after the whole
stream, from ``debug.coverage`` per prompt), ``requests``, ``prompt_tokens``,
``unique_prompt_tokens``, ``stored_tokens_with_dedup`` (bytes / bytes per token),
``cached_tokens_with_dedup``/``_without_dedup`` (radix hits SGLang reported in ``usage``). Top
level: ``plan``, ``bytes_per_token``, and per arm ``store`` (the store's counters at the end:
``evictions``, ``demotions``, ``expirations``, ``dropped_tokens``, ``unaligned_tokens_skipped``,
``bytes_deduplicated``, ...; an eviction, demotion, expiry or dropped row would make the bytes
mean less: ``store_clean`` is false then and ``problems`` names the counter).

Note [The multi-turn gap]: a reply's tokens are decoded, never prefilled, so no recording of them
exists; the next turn's prompt contains them. With the radix cache on, SGLang serves them from
the KV cache the decode left (the radix hit runs to the last whole page the tree holds), so they
are never prefilled either: they stay a hole in the store (``coverage_with_dedup`` < 1: those
positions are recomputed in training). Without the radix cache every prompt is prefilled whole,
replies included, so its coverage is 1. The ratio therefore compares unequal contents: the with
arm holds fewer tokens than the unique prompt tokens (``ideal_ratio`` counts each reply token as
stored once; the with arm stores it zero times), which pushes ``ratio`` ABOVE ``ideal_ratio``,
bought with coverage, not with dedup. Re-recorded pages push the other way: a radix hit ends on a
page boundary, so the partial page at the end of each cached prefix is recorded again by the next
request that extends it (and the last page of a shared system prompt once per request).
``shared_system_prompt`` has no decoded tokens in its prompts: only the latter applies, so its
``ratio`` is below ``ideal_ratio`` and its coverage is 1.
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import httpx

from eval.loadgen.workloads import PROMPT_HEAVY_SYSTEM, Conversation, messages_for_turn
from eval.server import flush_cache

NAME = "dedup"

QUICK = {"conversations": 3, "turns": 3, "shared": 8, "max_tokens": 24}
FULL = {"conversations": 8, "turns": 4, "shared": 16, "max_tokens": 32}
SMOKE = {"conversations": 2, "turns": 2, "shared": 3, "max_tokens": 4}  # --smoke (tests, tiny model)
SYSTEM_WORDS = 300
WORKLOADS = ("multi_turn", "shared_system_prompt")
HOST_BYTES = 2 * 1024**3  # the without arm of the full run stores ~1 GB of fp32 down rows
BOTH = ("train.enabled=false", "record.plan=down", f"store.host_bytes={HOST_BYTES}",
        "server.enable_debug_commands=true")
ARMS = {"with": BOTH, "without": (*BOTH, "sglang.disable-radix-cache=true", "store.dedup=false")}
MUST_BE_ZERO = ("evictions", "demotions", "expirations", "dropped_tokens", "released_pages")


class Progress:
    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def __call__(self, message: str) -> None:
        print(f"[dedup +{time.monotonic() - self.t0:7.1f}s] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------- pure parts
def unique_prefix_tokens(prompts: Sequence[Sequence[int]]) -> int:
    """Positions of the prefix tree of ``prompts``: token i of a prompt is new unless another
    prompt (or an earlier one) has the same first i + 1 tokens."""
    root: dict[int, Any] = {}
    count = 0
    for prompt in prompts:
        node = root
        for token in prompt:
            child = node.get(token)
            if child is None:
                child = node[token] = {}
                count += 1
            node = child
    return count


def ideal_ratio(prompts: Sequence[Sequence[int]]) -> float:
    """Prompt tokens sent / unique prompt tokens: the bytes ratio if every prompt token were
    stored once per request without dedup and once per prefix-tree position with it."""
    unique = unique_prefix_tokens(prompts)
    return sum(len(p) for p in prompts) / unique if unique else float("nan")


def workload_fields(prompts: Sequence[Sequence[int]], arms: dict[str, dict[str, Any]],
                    bytes_per_token: int) -> dict[str, Any]:
    """One workload's fields from its prompts and each arm's measurements: ``arms[arm]`` has
    ``bytes`` (store growth), ``covered`` (covered tokens per prompt, in ``prompts`` order) and
    ``cached`` (radix-hit tokens reported)."""
    total = sum(len(p) for p in prompts)
    with_, without = arms["with"], arms["without"]
    for arm in (with_, without):
        if len(arm["covered"]) != len(prompts):
            raise ValueError("one covered count per prompt")
    return {
        "requests": len(prompts), "prompt_tokens": total,
        "unique_prompt_tokens": unique_prefix_tokens(prompts),
        "bytes_with_dedup": with_["bytes"], "bytes_without_dedup": without["bytes"],
        "ratio": without["bytes"] / with_["bytes"] if with_["bytes"] else float("nan"),
        "ideal_ratio": ideal_ratio(prompts),
        "coverage_with_dedup": sum(with_["covered"]) / total if total else float("nan"),
        "coverage_without_dedup": sum(without["covered"]) / total if total else float("nan"),
        "stored_tokens_with_dedup": with_["bytes"] / bytes_per_token,
        "stored_tokens_without_dedup": without["bytes"] / bytes_per_token,
        "cached_tokens_with_dedup": with_["cached"], "cached_tokens_without_dedup": without["cached"],
    }


def shared_system_conversations(convs: Sequence[Conversation], count: int,
                                system_words: int = SYSTEM_WORDS) -> list[Conversation]:
    """``count`` single-turn conversations behind one system prompt: instructions and the
    transcript of the first conversations (``system_words`` words), then each asks the first user
    turn of a later conversation."""
    words: list[str] = []
    used = 0
    while len(words) < system_words and used < len(convs):
        conv = convs[used]
        used += 1
        for i, human in enumerate(conv.human_turns):
            words += f"A: {human}".split()
            if i < len(conv.reference_replies):
                words += f"B: {conv.reference_replies[i]}".split()
    rest = [c for c in convs[used:] if c.human_turns and c.human_turns[0].strip()]
    if len(words) < system_words or len(rest) < count:
        raise ValueError("the workload is too small for the shared-system-prompt stream")
    system = (PROMPT_HEAVY_SYSTEM + " Earlier chat between A and B, for context:\n"
              + " ".join(words[:system_words]))
    return [Conversation(f"shared-{i}", (c.human_turns[0],), (), system) for i, c in enumerate(rest[:count])]


# ------------------------------------------------------------------------------- server side
def _post(client: httpx.Client, path: str, body: dict[str, Any]) -> dict[str, Any]:
    answer = client.post(path, json=body)
    if answer.status_code != 200:
        raise RuntimeError(f"POST {path} answered {answer.status_code}: {answer.text[:500]}")
    return dict(answer.json())


def _store(client: httpx.Client) -> dict[str, Any]:
    status = client.get("/alchemist/status").json()
    if "store" not in status or "record" in status.get("disabled", {}):
        raise RuntimeError(f"the server does not record: {status.get('disabled')}")
    return dict(status["store"]) | {"_plan": status.get("record_plan", {})}


def _complete(client: httpx.Client, model: str, ids: list[int], max_tokens: int) -> tuple[str, int]:
    """Sends ``ids``; returns (reply text, radix-hit tokens reported)."""
    out = _post(client, "/v1/completions", {"model": model, "prompt": ids, "max_tokens": max_tokens,
                                            "temperature": 0})
    details = (out.get("usage") or {}).get("prompt_tokens_details") or {}
    prompt_tokens = (out.get("usage") or {}).get("prompt_tokens")
    if prompt_tokens is not None and prompt_tokens != len(ids):
        raise RuntimeError(f"the server prefilled {prompt_tokens} tokens of a {len(ids)}-token prompt")
    return str(out["choices"][0]["text"]), int(details.get("cached_tokens") or 0)


def _covered(client: httpx.Client, ids: list[int]) -> int:
    answer = _post(client, "/alchemist/commands/debug.coverage", {"tokens": ids})
    result = answer.get("result", answer)
    return int(result["covered_tokens"])


Send = Callable[[list[int]], str]  # prompt ids -> the server's reply text
Driver = Callable[[Send], list[list[int]]]  # sends one workload's stream; returns its prompts


def multi_turn_driver(convs: Sequence[Conversation], turns: int,
                      template: Callable[[list[dict[str, str]]], list[int]]) -> Driver:
    """Each conversation turn by turn; a turn's prompt holds the server's earlier replies."""
    def drive(send: Send) -> list[list[int]]:
        prompts = []
        for conv in convs:
            replies: list[str] = []
            for turn in range(min(turns, len(conv.human_turns))):
                ids = template(messages_for_turn(conv, turn, replies))
                prompts.append(ids)
                replies.append(send(ids))
        return prompts
    return drive


def single_turn_driver(convs: Sequence[Conversation],
                       template: Callable[[list[dict[str, str]]], list[int]]) -> Driver:
    def drive(send: Send) -> list[list[int]]:
        prompts = [template(messages_for_turn(conv, 0, [])) for conv in convs]
        for ids in prompts:
            send(ids)
        return prompts
    return drive


def replay_driver(prompts: Sequence[list[int]]) -> Driver:
    """The same prompts again, in the same order (the without arm)."""
    def drive(send: Send) -> list[list[int]]:
        for ids in prompts:
            send(ids)
        return [list(ids) for ids in prompts]
    return drive


def _run_arm(ctx: Any, arm: str, drivers: dict[str, Driver], max_tokens: int,
             log: Progress) -> dict[str, Any]:
    """One server: each workload's stream (radix flushed before each), then coverage per prompt."""
    out: dict[str, Any] = {"prompts": {}, "measured": {}}
    with ctx.server(overrides=ARMS[arm]) as url, httpx.Client(base_url=url, timeout=600.0) as client:
        model = client.get("/v1/models").json()["data"][0]["id"]
        for name, drive in drivers.items():
            flush_cache(url)
            before = _store(client)["bytes_stored"]
            cached, sent = [0], [0]

            def send(ids: list[int]) -> str:
                text, hit = _complete(client, model, ids, max_tokens)
                cached[0] += hit
                sent[0] += 1
                log(f"{arm}: {name} request {sent[0]}: {len(ids)} prompt tokens, {hit} from the "
                    f"radix cache")
                return text

            out["prompts"][name] = drive(send)
            stored = _store(client)["bytes_stored"] - before
            out["measured"][name] = {"bytes": stored, "cached": cached[0]}
            log(f"{arm}: {name}: {len(out['prompts'][name])} requests, {stored} bytes stored")
        for name, prompts in out["prompts"].items():
            out["measured"][name]["covered"] = [_covered(client, ids) for ids in prompts]
        end = _store(client)
    out["plan"] = end.pop("_plan")
    out["store"] = end
    return out


def run(ctx: Any) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from alchemist_sgl.config import load_config
    from alchemist_sgl.prepare import resolve_model

    if ctx.url is not None:
        raise ValueError("dedup starts its own two servers (radix cache and store.dedup differ); "
                         "--url is not supported")
    p = SMOKE if ctx.smoke else QUICK if ctx.quick else FULL
    log = Progress()
    cfg = load_config(Path(ctx.config_path))
    tok = AutoTokenizer.from_pretrained(resolve_model(cfg.server.model, Path(cfg.server.cache_dir)))

    def template(messages: list[dict[str, str]]) -> list[int]:
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return [int(t) for t in (ids["input_ids"] if hasattr(ids, "keys") else ids)]

    convs = ctx.workload(min_turns=p["turns"])
    multi = list(convs[:p["conversations"]])
    others = list(convs[p["conversations"]:])
    random.Random(ctx.seed).shuffle(others)
    shared = shared_system_conversations(others, p["shared"])
    with_arm = _run_arm(ctx, "with", {"multi_turn": multi_turn_driver(multi, p["turns"], template),
                                      "shared_system_prompt": single_turn_driver(shared, template)},
                        p["max_tokens"], log)
    without_arm = _run_arm(ctx, "without", {name: replay_driver(prompts) for name, prompts
                                            in with_arm["prompts"].items()}, p["max_tokens"], log)
    return assemble(with_arm, without_arm, p)


def assemble(with_arm: dict[str, Any], without_arm: dict[str, Any], p: dict[str, Any]) -> dict[str, Any]:
    """The result's fields from the two arms (``_run_arm``'s dicts)."""
    bpt = int(with_arm["plan"].get("bytes_per_token") or 0)
    if bpt != int(without_arm["plan"].get("bytes_per_token") or 0):
        raise RuntimeError(f"the arms record different plans: {with_arm['plan']} vs {without_arm['plan']}")
    fields: dict[str, Any] = {}
    for name in WORKLOADS:
        prompts = with_arm["prompts"][name]
        if without_arm["prompts"][name] != prompts:
            raise RuntimeError(f"{name}: the without arm sent other prompts")
        fields[name] = workload_fields(prompts, {"with": with_arm["measured"][name],
                                                 "without": without_arm["measured"][name]}, bpt)
    problems = [f"{arm}: store.{k} = {stores[k]}" for arm, stores in
                (("with", with_arm["store"]), ("without", without_arm["store"]))
                for k in MUST_BE_ZERO if stores.get(k)]
    return {
        **fields,
        "plan": list(with_arm["plan"].get("tensors", ())), "bytes_per_token": bpt,
        "max_tokens": p["max_tokens"], "turns": p["turns"],
        "store": {"with": with_arm["store"], "without": without_arm["store"]},
        "store_clean": not problems, "problems": problems,
        "token_ids": "the model tokenizer's chat template applied by the harness; the prompts are "
                     "sent as token ids, so these are the ids the server prefilled",
    }
