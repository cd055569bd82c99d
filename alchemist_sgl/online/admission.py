"""Turning validated ``/alchemist/train/samples`` entries into ``PendingSample``s (scheduler side).

Owns ``SampleAdmission``: token ids from text (chat template for ``messages``), the completion
log for ``completion_id`` (its prompt, its output and the version that prefilled it), the kind
and weight from ``rating``/``score``, and the recording pin. The HTTP side already checked the
schema (api.py); what only the scheduler can check (an unknown completion, a sample longer than
the context) raises ``AdmissionError`` naming the field. All-or-nothing: on any error nothing is
queued and every pin taken is released. Imports only package value types.

Note [Text to tokens]: ``messages`` go through the tokenizer's chat template with the generation
prompt, as SGLang's chat route does; a ``prompt`` string is encoded as is (no special tokens
added); a ``response`` string is encoded and the end-of-sequence token appended, so the model also
learns where to stop (a served completion's output already ends with its stop token).
"""

from __future__ import annotations

from typing import Any, Callable

from alchemist_sgl.feedback.completion_log import SqliteCompletionLog
from alchemist_sgl.online.intake import PendingSample, SampleKind


class AdmissionError(ValueError):
    def __init__(self, field: str, message: str, http_status: int = 422) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.http_status = field, http_status


class SampleAdmission:
    """Builds pending samples. ``tokenize(text) -> ids``; ``chat(messages) -> ids``;
    ``eos_id``; ``completions``: the completion log (None: no ``completion_id`` entries);
    ``pin(prompt_ids, version) -> handle | None`` (None: nothing is recorded); ``unpin(handle)``;
    ``serving()`` -> the serving version name; ``max_tokens``: context bound."""

    def __init__(self, *, tokenize: Callable[[str], list[int]],
                 chat: Callable[[list[dict[str, str]]], list[int]], eos_id: int | None,
                 completions: SqliteCompletionLog | None,
                 pin: Callable[[list[int], str], object | None] | None,
                 unpin: Callable[[object], None], serving: Callable[[], str], max_tokens: int,
                 clock: Callable[[], float]) -> None:
        self.tokenize, self.chat, self.eos_id = tokenize, chat, eos_id
        self.completions, self._pin, self._unpin = completions, pin, unpin
        self.serving, self.max_tokens, self.clock = serving, max_tokens, clock

    def admit(self, entries: list[dict[str, Any]]) -> list[PendingSample]:
        out: list[PendingSample] = []
        try:
            for i, entry in enumerate(entries):
                out.append(self._one(f"samples[{i}]", entry))
        except Exception:
            self.release(out)
            raise
        return out

    def pin_prompt(self, prompt_ids: list[int], version: str | None) -> object | None:
        """A pin on the prompt's recording under ``version`` (the serving one when None)."""
        return self._pin(prompt_ids, version or self.serving()) if self._pin is not None else None

    def release(self, samples: list[PendingSample]) -> None:
        for s in samples:
            if s.handle is not None:
                self._unpin(s.handle)
                s.handle = None

    def _one(self, where: str, e: dict[str, Any]) -> PendingSample:
        prompt_ids: list[int] | None = None
        response_ids: list[int] | None = None
        prefill_version: str | None = None
        completion_id = e.get("completion_id")
        if completion_id is not None:
            entry = self.completions.get(completion_id, 0) if self.completions is not None else None
            if entry is None:
                raise AdmissionError(f"{where}.completion_id",
                                     f"unknown or expired completion '{completion_id}'")
            prompt_ids, response_ids = list(entry.prompt_ids), list(entry.output_ids)
            prefill_version = entry.prefill_version
        if e.get("prompt_ids") is not None:
            prompt_ids, prefill_version = list(e["prompt_ids"]), None
        elif e.get("messages") is not None:
            prompt_ids, prefill_version = self.chat(e["messages"]), None
        elif e.get("prompt") is not None:
            prompt_ids, prefill_version = self.tokenize(e["prompt"]), None
        if e.get("response_ids") is not None:
            response_ids = list(e["response_ids"])
        elif e.get("response") is not None:
            response_ids = self.tokenize(e["response"]) + ([self.eos_id] if self.eos_id is not None else [])
        if not prompt_ids:
            raise AdmissionError(f"{where}.prompt", "the prompt has no tokens")
        if not response_ids:
            raise AdmissionError(f"{where}.response", "the response has no tokens")
        if len(prompt_ids) + len(response_ids) > self.max_tokens:
            raise AdmissionError(f"{where}.response", f"prompt + response is {len(prompt_ids) + len(response_ids)} "
                                 f"tokens, more than the context ({self.max_tokens})")
        kind: SampleKind
        if e.get("rating") is not None:
            kind, weight = ("positive" if e["rating"] == "up" else "negative"), 1.0
        else:
            score = float(e["score"])
            kind, weight = ("positive" if score > 0 else "negative"), abs(score)
        # A prompt given as text or ids may still have been served (and recorded) at the serving
        # version; a completion's prompt was recorded at the version that prefilled it.
        version = prefill_version or self.serving()
        handle = self._pin(prompt_ids, version) if self._pin is not None else None
        return PendingSample(prompt_ids=prompt_ids, response_ids=response_ids, kind=kind,
                             weight=weight, prefill_version=version, completion_id=completion_id,
                             ref_logprobs=None, enqueued_at=self.clock(), source="samples",
                             handle=handle)
