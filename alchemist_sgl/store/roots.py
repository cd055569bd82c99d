"""Where each recording's page-key chain starts: shared by all requests, or one per request.

Owns ``ChainRoots``, the store's ``store.dedup`` switch (prefix.py Note [Solo keys]). With dedup
on, every chain starts at the namespace root, so requests sharing a prefix share its pages. With
dedup off, request ``rid``'s chain starts at ``solo_root(namespace, rid)``: no page is ever found
under another request's keys, and each recording stores its own copy of every row it prefills.
A reader that knows the rid finds that request's recording; one that knows only the prompt's
tokens (the online loop pins a completion's prompt) finds the latest recording of that exact
prompt, remembered for the last ``max_prompts`` recordings. Must not import sglang or torch.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

from alchemist_sgl.core.prefix import Namespace, PageKey, prompt_digest, solo_root


class ChainRoots:
    """Chain roots for writers and readers; ``is_dedup`` False gives each request its own."""

    def __init__(self, is_dedup: bool, max_prompts: int) -> None:
        self.is_dedup = is_dedup
        self._max_prompts = max(1, max_prompts)
        self._latest: OrderedDict[PageKey, PageKey] = OrderedDict()  # prompt digest -> solo root

    def for_writer(self, namespace: Namespace, rid: str, tokens: Sequence[int]) -> PageKey:
        """The root of request ``rid``'s chain (its prompt is ``tokens``)."""
        if self.is_dedup:
            return namespace.root
        root = solo_root(namespace, rid)
        digest = prompt_digest(namespace, tokens)
        self._latest[digest] = root
        self._latest.move_to_end(digest)
        while len(self._latest) > self._max_prompts:
            self._latest.popitem(last=False)
        return root

    def for_reader(self, namespace: Namespace, tokens: Sequence[int], rid: str | None = None
                   ) -> PageKey | None:
        """The root to read ``tokens`` from: the namespace's (dedup on), request ``rid``'s, or the
        latest recording's of exactly ``tokens``; None when dedup is off and there is none."""
        if self.is_dedup:
            return namespace.root
        if rid is not None:
            return solo_root(namespace, rid)
        return self._latest.get(prompt_digest(namespace, tokens))
