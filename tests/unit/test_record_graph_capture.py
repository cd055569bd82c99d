"""integration/graph_capture.py without SGLang: the SDPA tap (Note [Graph capture]) on inputs laid
out as torch_native's ``_run_sdpa_forward_extend`` lays them out (a padded query whose prefix rows
are uninitialised, keys and values gathered from a cache and moved to [heads, seq, d] views).
The tap's output must equal torch's SDPA exactly (it replaces it while serving), and its lse must
equal an fp32 log-sum-exp of the scaled causal scores of the new rows."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from alchemist_sgl.integration.graph_capture import LseTap

torch.set_num_threads(1)
H, KV, D = 6, 2, 16


def _backend_inputs(prefix: int, extend: int, dtype: torch.dtype, seed: int):
    """(padded query [1, H, S, d], key and value [1, KV, S, d] as strided views) of one
    sequence, as the backend builds them (torch_native_backend.py, per sequence)."""
    g = torch.Generator().manual_seed(seed)
    total = prefix + extend
    query = torch.randn(extend, H, D, generator=g).to(dtype).movedim(0, 1)  # [H, extend, d]
    padded = torch.empty((H, total, D), dtype=dtype)
    padded[:, prefix:, :] = query
    cache_k = torch.randn(64, KV, D, generator=g).to(dtype)
    cache_v = torch.randn(64, KV, D, generator=g).to(dtype)
    tokens = torch.randperm(64, generator=g)[:total]
    k, v = cache_k[tokens].movedim(0, 1), cache_v[tokens].movedim(0, 1)
    return padded.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)


def _reference_lse(q: torch.Tensor, k: torch.Tensor, scale: float, prefix: int) -> torch.Tensor:
    """[extend, H] fp32: logsumexp over keys [0, i] of row i's scaled scores, rows [prefix:]."""
    qf, kf = q[0].float(), k[0].float().repeat_interleave(H // KV, dim=0)
    s = torch.einsum("hid,hjd->hij", qf, kf) * scale
    n = s.shape[-1]
    s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return torch.logsumexp(s, dim=-1)[:, prefix:].t()


def _tap(is_recording: bool = True) -> LseTap:
    return LseTap(SimpleNamespace(is_recording=is_recording), F.scaled_dot_product_attention)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-4)])
def test_tap_equals_sdpa_and_keeps_the_lse(dtype, tol) -> None:
    tap = _tap()
    tap.seq_lens = [7, 1, 20]  # a chunk after a 9-row prefix, a decode-like row, a fresh prompt
    shapes = [(9, 7), (30, 1), (0, 20)]
    refs = []
    for seed, (prefix, extend) in enumerate(shapes):
        q, k, v = _backend_inputs(prefix, extend, dtype, seed)
        kw = dict(enable_gqa=True, scale=D ** -0.5, is_causal=True)
        want = F.scaled_dot_product_attention(q, k, v, **kw)
        got = tap(q, k, v, **kw)
        assert got.shape == want.shape and got.dtype == want.dtype
        assert torch.equal(got[:, :, prefix:], want[:, :, prefix:])  # the rows the backend keeps
        refs.append(_reference_lse(q, k, D ** -0.5, prefix))
    rows = tap.drain_rows()
    assert rows is not None and rows.dtype == torch.float32 and rows.shape == (28, H)
    assert float((rows - torch.cat(refs)).abs().max()) <= tol
    assert tap.pending == []


def test_tap_passes_through_when_not_recording_or_masked() -> None:
    q, k, v = _backend_inputs(0, 5, torch.float32, 3)
    idle = _tap(is_recording=False)
    assert torch.equal(idle(q, k, v, is_causal=True, enable_gqa=True),
                       F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
    assert idle.pending == []
    masked = _tap()
    mask = torch.ones(5, 5, dtype=torch.bool).tril()
    masked(q, k, v, attn_mask=mask, enable_gqa=True)
    assert masked.pending == []  # another kernel: nothing kept, the forward ends one output short


def test_drain_refuses_a_count_mismatch() -> None:
    tap = _tap()
    tap.seq_lens = [5, 5]
    q, k, v = _backend_inputs(0, 5, torch.float32, 4)
    tap(q, k, v, is_causal=True, enable_gqa=True)
    assert tap.drain_rows() is None and tap.pending == []
