"""The CPU stand-ins under patches/: the one real kernel, and loud failure for the rest."""

from __future__ import annotations

import importlib
import sys

import pytest
import torch

from alchemist_sgl.integration.environment import CPU_STAND_INS


@pytest.fixture()
def stand_ins(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(CPU_STAND_INS))
    for name in [m for m in sys.modules if m == "sgl_kernel" or m.startswith("torchvision")]:
        monkeypatch.delitem(sys.modules, name)
    yield importlib.import_module("sgl_kernel"), importlib.import_module("torchvision")


def _reference(req_pool_indices, req_to_token, start, end, out_cache_loc):
    expected = req_to_token.clone()
    cursor = 0
    for i in range(len(req_pool_indices)):
        n = int(end[i] - start[i])
        for j in range(n):
            expected[int(req_pool_indices[i]), int(start[i]) + j] = out_cache_loc[cursor + j]
        cursor += n
    return expected


def test_assign_req_to_token_pool_cpu_matches_elementwise_reference(stand_ins) -> None:
    sgl_kernel, _ = stand_ins
    gen = torch.Generator().manual_seed(0)
    req_to_token = torch.zeros(6, 40, dtype=torch.int32)
    req_pool_indices = torch.tensor([4, 1, 3], dtype=torch.int64)
    start = torch.tensor([0, 7, 16], dtype=torch.int64)   # fresh, mid-page radix hit, page-aligned hit
    end = torch.tensor([5, 19, 17], dtype=torch.int64)
    total = int((end - start).sum())
    out_cache_loc = torch.randint(1, 1000, (total,), generator=gen, dtype=torch.int64)
    expected = _reference(req_pool_indices, req_to_token, start, end, out_cache_loc)
    sgl_kernel.assign_req_to_token_pool_cpu(req_pool_indices, req_to_token, start, end, out_cache_loc, 40)
    assert torch.equal(req_to_token, expected)
    assert int((req_to_token != 0).sum()) == total


def test_unimplemented_sgl_kernel_names_itself(stand_ins) -> None:
    sgl_kernel, _ = stand_ins
    from sgl_kernel import merge_state_v2  # noqa: PLC0415 (import succeeds, like SGLang's module-level imports)

    with pytest.raises(NotImplementedError, match="sgl_kernel.merge_state_v2"):
        merge_state_v2(torch.zeros(1))


def test_torchvision_stand_in_imports_and_fails_loudly_when_used(stand_ins) -> None:
    _, torchvision = stand_ins
    import torchvision.transforms as transforms  # noqa: PLC0415

    assert torchvision.IS_ALCHEMIST_STAND_IN
    with pytest.raises(NotImplementedError, match="torchvision.transforms.Resize"):
        transforms.Resize(224)
