"""Note [Version stamp] (integration/training.py): ``_stamp`` over plain stand-in objects.

A request that holds no KV yet gets ``extra_key = "wv=<serving version>|" + its own key`` each time
it is admitted, so one that waited across a publish is re-stamped with the new version, from its
original key (never an accumulation of prefixes); a request that holds KV is never re-stamped.
The module must import without sglang (its sglang imports are inside the hook functions).
"""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

from alchemist_sgl.integration.training import _stamp


def make_req(extra_key: str | None, *, pool_idx: int | None = None, allocated: int = 0):
    return SimpleNamespace(kv=SimpleNamespace(req_pool_idx=pool_idx, kv_allocated_len=allocated),
                           extra_key=extra_key)


def make_rt(version: str):
    return SimpleNamespace(state=SimpleNamespace(weight_version=version))


def test_waiting_request_is_restamped_from_its_original_key() -> None:
    rt, req = make_rt("v3"), make_req("user-7")
    _stamp(rt, req)
    assert req.extra_key == "wv=v3|user-7"
    assert req._alchemist_prefill_version == "v3"
    _stamp(rt, req)  # admitted again at the same version: unchanged
    assert req.extra_key == "wv=v3|user-7"
    rt.state.weight_version = "v4"  # a publish while it waited
    _stamp(rt, req)
    assert req.extra_key == "wv=v4|user-7"
    assert req._alchemist_prefill_version == "v4"
    rt.state.weight_version = "v5"
    _stamp(rt, req)
    assert req.extra_key == "wv=v5|user-7"


def test_none_original_key() -> None:
    rt, req = make_rt("v0"), make_req(None)
    _stamp(rt, req)
    assert req.extra_key == "wv=v0|"
    rt.state.weight_version = "v1"
    _stamp(rt, req)
    assert req.extra_key == "wv=v1|"


def test_distinct_versions_give_distinct_namespaces() -> None:
    a, b = make_req("k"), make_req("k")
    _stamp(make_rt("v1"), a)
    _stamp(make_rt("v2"), b)
    assert a.extra_key != b.extra_key


def test_request_holding_kv_is_never_restamped() -> None:
    rt = make_rt("v1")
    for req in (make_req("k"), make_req(None)):
        _stamp(rt, req)
        stamped = req.extra_key
        req.kv.req_pool_idx = 5  # now running: holds KV
        rt.state.weight_version = "v2"
        _stamp(rt, req)
        assert req.extra_key == stamped and req._alchemist_prefill_version == "v1"
        rt.state.weight_version = "v1"
    chunked = make_req("k", allocated=16)  # KV allocated, no pool slot yet: still holds KV
    _stamp(make_rt("v9"), chunked)
    assert chunked.extra_key == "k" and not hasattr(chunked, "_alchemist_prefill_version")
    running = make_req("k", pool_idx=0)  # pool index 0 is a real slot, not "none"
    _stamp(make_rt("v9"), running)
    assert running.extra_key == "k"


def test_module_imports_without_sglang() -> None:
    code = ("import sys, alchemist_sgl.integration.training; "
            "print('sglang' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.strip() == "False"
