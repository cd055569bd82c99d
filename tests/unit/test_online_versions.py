"""online/versions.py: ids never reused, persistence, lineage lag, cross-process readers."""

from __future__ import annotations

import dataclasses
import json
import pytest

from alchemist_sgl.errors import VersionFileCorrupt
from alchemist_sgl.online import versions
from alchemist_sgl.online.versions import (ServingVersionReader, VersionInfo, VersionRegistry,
                                           read_serving_name)


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        self.t += 1.0
        return self.t


@pytest.fixture
def path(tmp_path):
    return tmp_path / "state" / "versions.json"


def test_fresh_registry_holds_v0_and_writes_it(path):
    reg = VersionRegistry(path, clock=FakeClock())
    v0 = reg.serving
    assert (v0.id, v0.name, v0.step, v0.state, v0.parent) == (0, "v0", 0, "serving", None)
    assert path.exists()
    assert json.loads(path.read_text())["serving"] == "v0"
    assert set(v0.as_status()) == {"name", "step", "created_at", "state", "metric",
                                   "adapter_path", "parent", "guard", "ratings"}
    assert v0.as_status()["ratings"] == {"up": 0, "down": 0, "n": 0, "down_rate": None}
    assert v0.as_status((3, 1))["ratings"] == {"up": 3, "down": 1, "n": 4, "down_rate": 0.25}


def test_mint_serves_and_retires_and_persists_across_reopen(path):
    reg = VersionRegistry(path, clock=FakeClock())
    v1 = reg.mint(step=1, parent="v0", adapter_path="a/v1")
    v2 = reg.mint(step=2, parent="v1", metric=1.5)
    assert reg.serving == v2 and reg.get("v1").state == "retired" and reg.get("v0").state == "retired"
    reopened = VersionRegistry(path, clock=FakeClock())
    assert reopened.serving.name == "v2"
    assert reopened.get("v1") == dataclasses.replace(v1, state="retired")
    assert reopened.next_id == 3
    assert reopened.mint(step=3, parent="v2").name == "v3"
    reopened.set_metric("v0", 2.0)
    reopened.set_adapter_path("v3", "a/v3")
    again = VersionRegistry(path)
    assert again.v0_metric() == 2.0 and again.get("v3").adapter_path == "a/v3"
    assert again.last_accepted_metric() is None  # v3 serves, not measured


def test_rejected_mint_consumes_an_id_and_keeps_serving(path):
    reg = VersionRegistry(path, clock=FakeClock())
    reg.mint(step=1, parent="v0", metric=1.0)
    rej = reg.mint(step=2, parent="v1", metric=9.0, is_rejected=True)
    assert rej.state == "rejected" and rej.name == "v2"
    assert reg.serving.name == "v1" and reg.last_accepted_metric() == 1.0
    assert reg.mint(step=2, parent="v1").name == "v3"  # v2 is never handed out again
    assert VersionRegistry(path).get("v2").state == "rejected"


def test_lag_along_lineage_and_across_a_rollback_branch(path):
    reg = VersionRegistry(path, clock=FakeClock())
    for step in (1, 2, 3):  # v1, v2, v3 in a line
        reg.mint(step=step, parent=reg.serving.name)
    assert reg.lag("v3", "v3") == 0
    assert reg.lag("v1", "v3") == 2 and reg.lag("v0", "v3") == 3
    assert reg.lag("v3", "v1") is None  # a descendant is not an ancestor
    # Rollback to v1: a new id whose parent is the target; v2, v3 are a dead branch.
    rb = reg.mint(step=reg.get("v1").step, parent="v1")
    assert rb.name == "v4" and reg.get("v3").state == "retired"
    assert reg.lag("v1", "v4") == 1
    assert reg.lag("v2", "v4") is None and reg.lag("v3", "v4") is None
    rej = reg.mint(step=2, parent="v4", is_rejected=True)
    child = reg.mint(step=2, parent=rej.name)  # even if something names a rejected parent ...
    assert reg.lag(rej.name, child.name) is None  # ... a rejected version is no ancestor
    assert reg.lag("v4", child.name) is None
    assert reg.lag(None, "v4") is None and reg.lag("v99", "v4") is None


def test_get_unknown_raises_a_clear_key_error(path):
    reg = VersionRegistry(path)
    with pytest.raises(KeyError, match="unknown version 'v7'.*v0..v0"):
        reg.get("v7")
    with pytest.raises(KeyError):
        reg.mint(step=1, parent="v5")


def test_page_status_and_total_newest_first(path):
    reg = VersionRegistry(path, clock=FakeClock())
    for step in range(1, 26):
        reg.mint(step=step, parent=reg.serving.name)
    assert reg.total == 26
    assert [v.name for v in reg.page(3, 0)] == ["v25", "v24", "v23"]
    assert [v.name for v in reg.page(3, 24)] == ["v1", "v0"]
    status = reg.status()
    assert len(status) == 20 and status[0]["name"] == "v25" and status[0]["state"] == "serving"
    assert len(reg.status(cap=5)) == 5


def test_restoring_an_older_state_never_reuses_ids(path):
    reg = VersionRegistry(path, clock=FakeClock())
    reg.mint(step=1, parent="v0")
    reg.mint(step=2, parent="v1")
    old = reg.state()  # checkpoint taken while v2 serves, next_id 3
    reg.mint(step=3, parent="v2")
    reg.mint(step=4, parent="v3", adapter_path="a/v4")
    reg.set_metric("v2", 0.5)  # measured after the checkpoint
    reg.restore(old)
    assert reg.serving.name == "v2" and reg.next_id == 5
    assert reg.get("v2").metric == 0.5  # what only the file knew is kept
    assert reg.get("v4").state == "retired" and reg.get("v4").adapter_path == "a/v4"
    assert reg.mint(step=3, parent="v2").name == "v5"
    assert reg.lag("v3", "v5") is None and reg.lag("v2", "v5") == 1
    # The restore itself was persisted: a re-open agrees.
    reopened = VersionRegistry(path)
    assert reopened.next_id == 6 and reopened.serving.name == "v5"


def test_restore_into_a_fresh_file_takes_the_checkpoint_counter(tmp_path):
    src = VersionRegistry(tmp_path / "a.json")
    for step in (1, 2):
        src.mint(step=step, parent=src.serving.name)
    src.mint(step=3, parent="v2", is_rejected=True)
    dst = VersionRegistry(tmp_path / "b.json")
    dst.restore(src.state())
    assert dst.serving.name == "v2" and dst.next_id == 4 and dst.get("v3").state == "rejected"


def test_writes_are_atomic_no_tmp_left(path):
    reg = VersionRegistry(path)
    reg.mint(step=1, parent="v0")
    assert [p.name for p in path.parent.iterdir()] == ["versions.json"]


def test_corrupt_file_raises_typed(path):
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    with pytest.raises(VersionFileCorrupt, match="versions.json"):
        VersionRegistry(path)
    with pytest.raises(VersionFileCorrupt):
        read_serving_name(path)


def test_version_info_name_follows_id():
    assert VersionInfo(id=7, step=1, created_at=0.0, state="retired").name == "v7"
    with pytest.raises(ValueError):
        VersionInfo(id=7, name="v8", step=1, created_at=0.0, state="retired")
    with pytest.raises(ValueError):
        VersionInfo(id=7, step=1, created_at=0.0, state="live")


def test_readers_for_another_process(path, monkeypatch):
    assert read_serving_name(path) == "v0"  # no file yet
    reader = ServingVersionReader(path)
    assert reader.current() == "v0"
    reg = VersionRegistry(path)
    reg.mint(step=1, parent="v0")
    reads = []
    real = versions.read_serving_name
    monkeypatch.setattr(versions, "read_serving_name", lambda p: reads.append(p) or real(p))
    assert read_serving_name(path) == "v1" and reader.current() == "v1"
    assert reader.current() == "v1" and reader.current() == "v1"
    assert len(reads) == 1  # re-read only when the file changed
    reg.mint(step=2, parent="v1")
    assert reader.current() == "v2" and len(reads) == 2
    reg.mint(step=3, parent="v2", is_rejected=True)  # file changes, serving does not
    assert reader.current() == "v2" and len(reads) == 3
