"""Chained page hashes of token ids, namespaced by base weight version and adapter (pure).

Owns the key scheme of the activation store (docs/recording-and-replay.md, "The activation store").
Must not import torch, sglang or any package module but ``errors``.

A token sequence is cut into pages of ``page_tokens`` tokens (<= 16). The key of page k is

    key_k = H("page", key_{k-1}, tokens[k*P : (k+1)*P])       key_{-1} = namespace root

so a key names the page's tokens AND everything before them (like SGLang's radix tree and
nano-vllm's block hashes): two requests share a key exactly when they share the whole prefix up to
the end of that page. The root is ``H("root", base_version, adapter)``: recordings are outputs of
the base projections, but every layer's input depends on the served weights of the layers below
(base and adapter), so a page is only valid under the same base version and the same adapter.

Note [Tail keys]: the last ``n < P`` tokens of a prompt form a partial tail page. Its key is
``H("tail", parent_key, tail_tokens)`` where ``parent_key`` is the key of the full page before it
(the root for a prompt shorter than one page). The domain tags "page"/"tail" keep a tail of P tokens
from ever colliding with a full page; the tail tokens' byte length makes tails of different lengths
distinct. A lookup that holds a longer sequence tries the tail lengths stored under the parent key
(the store indexes them), longest first.

Note [Solo keys]: with ``store.dedup: false`` every recording is its own: the chain of request
``rid`` starts at ``solo_root(namespace, rid) = H("solo", namespace root, rid)`` instead of the
namespace root, so no two requests share a key (no page is reused, each stores its own copy).
``prompt_digest`` names a whole prompt (H("prompt", namespace root, tokens)): the store maps it
to the root of the latest recording of that exact prompt, for readers that know only the tokens.

H is BLAKE2b with a 16-byte digest over little-endian int64 token ids: collisions are out of reach
(2^-64 birthday bound at 2^32 pages); hashing a 16-token page costs a few microseconds
in Python (~8 us measured on a loaded 2-core box), ~2 ms for a 4k-token prompt.
"""

from __future__ import annotations

import hashlib
import struct
from array import array
from dataclasses import dataclass
from typing import Sequence

PageKey = bytes  # 16 bytes
MAX_PAGE_TOKENS = 16
_DIGEST_BYTES = 16


@dataclass(frozen=True)
class Namespace:
    """What a recording depends on besides token ids: base weight version and served adapter.

    ``adapter`` is None when serving the base (or merged) weights; otherwise a name that changes
    whenever the adapter's weights change (e.g. "lora@v3").
    """

    base_version: str
    adapter: str | None = None

    @property
    def root(self) -> PageKey:
        """The parent key of page 0."""
        adapter = "" if self.adapter is None else "a:" + self.adapter
        return _digest(b"root", self.base_version.encode(), b"\x00", adapter.encode())


def _digest(*parts: bytes) -> PageKey:
    h = hashlib.blake2b(digest_size=_DIGEST_BYTES)
    for part in parts:
        h.update(struct.pack("<I", len(part)))
        h.update(part)
    return h.digest()


def _token_bytes(tokens: Sequence[int]) -> bytes:
    return array("q", tokens).tobytes()


def page_key(parent: PageKey, page_tokens: Sequence[int]) -> PageKey:
    """Key of a FULL page whose tokens are ``page_tokens`` after the prefix keyed by ``parent``."""
    return _digest(b"page", parent, _token_bytes(page_tokens))


def tail_key(parent: PageKey, tail_tokens: Sequence[int]) -> PageKey:
    """Key of a partial tail page (1 <= len < page size) after ``parent``. See Note [Tail keys]."""
    if not tail_tokens:
        raise ValueError("a tail page holds at least one token")
    return _digest(b"tail", parent, _token_bytes(tail_tokens))


def solo_root(namespace: Namespace, rid: str) -> PageKey:
    """The chain root of request ``rid``'s own recording (Note [Solo keys])."""
    return _digest(b"solo", namespace.root, rid.encode())


def prompt_digest(namespace: Namespace, tokens: Sequence[int]) -> PageKey:
    """A name for the whole prompt ``tokens`` under ``namespace`` (Note [Solo keys])."""
    return _digest(b"prompt", namespace.root, _token_bytes(tokens))


def _check_page_tokens(page_tokens: int) -> None:
    if not 1 <= page_tokens <= MAX_PAGE_TOKENS:
        raise ValueError(f"page_tokens must be in [1, {MAX_PAGE_TOKENS}], got {page_tokens}")


def chain_keys(tokens: Sequence[int], page_tokens: int, namespace: Namespace,
               num_pages: int | None = None, root: PageKey | None = None) -> list[PageKey]:
    """Keys of the full pages of ``tokens`` (len(tokens) // page_tokens of them), in order.

    ``num_pages`` limits the count (the chain is a prefix, so fewer pages cost less). ``root``:
    the chain's root instead of the namespace's (a solo recording, Note [Solo keys]).
    """
    _check_page_tokens(page_tokens)
    full = len(tokens) // page_tokens
    if num_pages is not None:
        full = min(full, num_pages)
    keys: list[PageKey] = []
    parent = namespace.root if root is None else root
    for k in range(full):
        parent = page_key(parent, tokens[k * page_tokens:(k + 1) * page_tokens])
        keys.append(parent)
    return keys

