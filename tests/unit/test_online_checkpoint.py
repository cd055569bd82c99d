"""online/checkpoint.py: bitwise round trip, newest two kept, torn tmp ignored, typed mismatch."""

from __future__ import annotations

import pytest
import torch

from alchemist_sgl.errors import CheckpointCorrupt, CheckpointIncompatible
from alchemist_sgl.online.checkpoint import CheckpointMeta, CheckpointStore

META = CheckpointMeta(model="tiny", rank=8, alpha=16.0, targets=("q", "v"), dtype="float32")


def state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"adapter": {"0_q.A": torch.randn(8, 16, generator=g),
                        "0_q.B": torch.randn(16, 8, generator=g).to(torch.bfloat16)},
            "optimizer": {"state": {0: {"step": torch.tensor(3.0),
                                        "exp_avg": torch.randn(8, 16, generator=g)}},
                          "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "params": [0]}]},
            "versions": {"next_id": 4, "versions": []}, "queue": [{"prompt_ids": [1, 2]}],
            "steps": seed}


def assert_bitwise_equal(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a.view(torch.uint8) if a.dim() else a, b.view(torch.uint8) if b.dim() else b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_bitwise_equal(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_bitwise_equal(x, y)
    else:
        assert a == b


def test_empty_folder_loads_none(tmp_path):
    assert CheckpointStore(tmp_path / "missing").load_latest(META) is None


def test_save_load_bitwise_and_keep_newest_two(tmp_path):
    store = CheckpointStore(tmp_path / "ck")
    for step in (2, 4, 6):
        path = store.save(step, state(step), META)
    assert path.name == "ckpt-00000006.pt"
    assert store.steps() == [4, 6]
    assert sorted(p.name for p in store.folder.iterdir()) == ["ckpt-00000004.pt",
                                                               "ckpt-00000006.pt"]
    assert_bitwise_equal(store.load_latest(META), state(6))


def test_torn_tmp_file_is_ignored_and_cleaned(tmp_path):
    store = CheckpointStore(tmp_path)
    store.save(4, state(4), META)
    torn = tmp_path / ".ckpt-00000008.pt.tmp.12345"  # a crash mid-write of step 8
    torn.write_bytes(b"\x80\x02garbage")
    assert store.steps() == [4]
    assert_bitwise_equal(store.load_latest(META), state(4))
    store.save(5, state(5), META)
    assert not torn.exists()


def test_incompatible_meta_names_each_field(tmp_path):
    store = CheckpointStore(tmp_path / "x")
    store.save(4, state(4), META)
    other = CheckpointMeta(model="tiny", rank=16, alpha=16.0, targets=("q", "v"), dtype="float32")
    with pytest.raises(CheckpointIncompatible) as e:
        store.load_latest(other)
    assert e.value.fields == ("rank",)
    assert str(e.value) == (f"checkpoint {tmp_path / 'x' / 'ckpt-00000004.pt'} was written for "
                            "rank 8, this server trains rank 16: move the folder away or set "
                            "train.checkpoint_dir")
    worse = CheckpointMeta(model="smollm2", rank=8, alpha=16.0, targets=("q",), dtype="bfloat16")
    with pytest.raises(CheckpointIncompatible, match="for model tiny, this server trains smollm2")\
            as e:
        store.load_latest(worse)
    assert e.value.fields == ("model", "targets", "dtype")
    assert "bfloat16" in str(e.value) and "['q']" in str(e.value)


def test_unreadable_checkpoint_raises_typed(tmp_path):
    (tmp_path / "ckpt-00000001.pt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointCorrupt, match="ckpt-00000001.pt"):
        CheckpointStore(tmp_path).load_latest(META)
