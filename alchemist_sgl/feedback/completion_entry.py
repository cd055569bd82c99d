"""``CompletionEntry``: one finished choice of a served request, as the completion logs keep it.

Owns the value type that the durable log (completion_log.py) stores and the scheduler's in-memory
log (online/completions.py) holds. Imports only the standard library.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CompletionEntry:
    """One finished choice of a served request.

    ``prefill_version`` names the version whose weights prefilled the prompt (the radix namespace
    the request was admitted under); ``weight_versions`` are SGLang's spans over the output, as
    dicts, in order. ``output_logprobs`` (one per output token) are the serving version's.
    Times are seconds on the server's wall clock.
    """

    rid: str
    choice_index: int
    prompt_ids: tuple[int, ...]
    output_ids: tuple[int, ...]
    prefill_version: str | None
    weight_versions: tuple[dict[str, object], ...]  # JSON dicts
    finish_reason: str | None
    created_at: float
    finished_at: float
    output_logprobs: tuple[float, ...] | None = None
