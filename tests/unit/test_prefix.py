"""prefix.py: chained page keys, tail keys, namespaces."""

from __future__ import annotations

import pytest

from alchemist_sgl.core.prefix import Namespace, chain_keys, page_key, tail_key

NS = Namespace("v0")


def test_chain_keys_count_and_prefix_property() -> None:
    tokens = list(range(100))
    keys = chain_keys(tokens, 16, NS)
    assert len(keys) == 6  # 96 tokens in full pages, 4-token tail not included
    assert len(set(keys)) == 6
    # A key names the page AND everything before it: a sequence sharing 40 tokens shares 2 pages.
    other = tokens[:40] + [7] * 60
    other_keys = chain_keys(other, 16, NS)
    assert other_keys[:2] == keys[:2]
    assert all(a != b for a, b in zip(other_keys[2:], keys[2:]))


def test_same_page_tokens_after_different_prefix_differ() -> None:
    a = [1] * 16 + [5] * 16
    b = [2] * 16 + [5] * 16
    assert chain_keys(a, 16, NS)[1] != chain_keys(b, 16, NS)[1]


def test_namespaces_separate_base_version_and_adapter() -> None:
    tokens = list(range(32))
    base = chain_keys(tokens, 16, Namespace("v0"))
    assert chain_keys(tokens, 16, Namespace("v1")) != base
    assert chain_keys(tokens, 16, Namespace("v0", "lora@v3")) != base
    assert chain_keys(tokens, 16, Namespace("v0", "lora@v3")) != chain_keys(
        tokens, 16, Namespace("v0", "lora@v4"))
    assert chain_keys(tokens, 16, Namespace("v0")) == base  # deterministic


def test_tail_keys_distinct_from_pages_and_by_length() -> None:
    parent = NS.root
    page = list(range(16))
    assert tail_key(parent, page[:15]) != tail_key(parent, page[:14])
    # Domain tags: a "tail" of a full page's tokens never equals the page key.
    assert tail_key(parent, page) != page_key(parent, page)
    with pytest.raises(ValueError):
        tail_key(parent, [])


def test_page_tokens_bounds() -> None:
    with pytest.raises(ValueError):
        chain_keys([1, 2, 3], 17, NS)
    with pytest.raises(ValueError):
        chain_keys([1, 2, 3], 0, NS)
    assert len(chain_keys(list(range(10)), 1, NS)) == 10
    assert len(chain_keys(list(range(100)), 16, NS, num_pages=3)) == 3
