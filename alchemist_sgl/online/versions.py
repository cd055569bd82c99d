"""Version ids: one per published weight state, monotonic, never reused, persisted atomically.

Owns ``VersionInfo`` (one row of ``/alchemist/status.versions``), ``VersionRegistry`` (the lineage,
the serving version, the ``next_id`` counter, the JSON file) and the cheap cross-process readers
``read_serving_name`` / ``ServingVersionReader``. Imports only the standard library,
``alchemist_sgl.errors`` and the pure guard.py (``Ratings``); never torch, sglang, or
alchemist_sgl.train.

Note [ids are never reused] (docs/online-loop.md): the same id names the radix namespace, the
store namespace, recordings and SGLang's weight_version, so handing an id out twice would let KV or
recordings of other weights pass as current. The file keeps a ``next_id`` counter that only grows:
a gate rejection consumes an id, a rollback mints a new one, and ``restore`` of an older checkpoint
keeps ``max(persisted, restored)``. Every mutation is durable before the method returns.

Note [restore merges]: ``restore(state)`` makes the checkpoint's serving version serve again and
keeps the versions the file knows beyond the checkpoint, as ``retired`` (or ``rejected``,
``guarded``), so ``get`` still finds them and lineage through them reads correctly: they are not
ancestors of anything minted afterwards. For an id both know, the state comes from the checkpoint
(but a version the file says is ``guarded`` and the checkpoint ``retired`` stays ``guarded``) and
a metric, adapter path or guard evidence recorded only in the file is kept. A checkpoint older
than a guard rollback makes the guarded version serve again, with its evidence: the feedback guard
rolls it back once more at its first check (feedback_guard.py).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Mapping

from alchemist_sgl.errors import VersionFileCorrupt
from alchemist_sgl.online.atomic import atomic_write_bytes
from alchemist_sgl.online.guard import Ratings

VersionState = Literal["serving", "retired", "rejected", "guarded"]
_STATES = ("serving", "retired", "rejected", "guarded")
RatingCounts = Mapping[str, tuple[int, int]]  # (up, down) thumbs by version (ratings_by_version)
_FORMAT = 1


@dataclass(frozen=True, kw_only=True)
class VersionInfo:
    """One version. ``name`` is always ``f"v{id}"``; ``parent`` names the version it trained from
    (a rollback's parent is its target); ``metric`` is the gate's held-out NLL (nats/token);
    ``guard`` is the feedback guard's evidence for a ``guarded`` version (feedback_guard.py)."""

    id: int
    name: str = ""
    step: int
    created_at: float
    state: VersionState
    metric: float | None = None
    adapter_path: str | None = None
    parent: str | None = None
    guard: dict[str, object] | None = None

    def __post_init__(self) -> None:
        if not self.name:
            object.__setattr__(self, "name", f"v{self.id}")
        if self.name != f"v{self.id}" or self.id < 0:
            raise ValueError(f"version name {self.name!r} does not match id {self.id}")
        if self.state not in _STATES:
            raise ValueError(f"version state {self.state!r} is not one of {_STATES}")

    def as_status(self, ratings: tuple[int, int] | None = None) -> dict[str, Any]:
        """The ``versions`` entry of the API (docs/api.md); ``ratings``: its (up, down) thumbs."""
        return {**self._fields(), "ratings": Ratings(*(ratings or (0, 0))).as_status()}

    def as_record(self) -> dict[str, Any]:
        return {"id": self.id, **self._fields()}

    def _fields(self) -> dict[str, Any]:
        return {"name": self.name, "step": self.step, "created_at": self.created_at,
                "state": self.state, "metric": self.metric, "adapter_path": self.adapter_path,
                "parent": self.parent, "guard": copy.deepcopy(self.guard)}


def _parse(data: object) -> tuple[int, dict[int, VersionInfo]]:
    """(next_id, versions by id) from a state dict; ValueError when malformed."""
    if not isinstance(data, dict) or not isinstance(data.get("versions"), list):
        raise ValueError("expected an object with a 'versions' list")
    versions: dict[int, VersionInfo] = {}
    for rec in data["versions"]:
        try:
            v = VersionInfo(**rec)
        except TypeError as e:
            raise ValueError(f"bad version record {rec!r}: {e}") from e
        versions[v.id] = v
    serving = [v for v in versions.values() if v.state == "serving"]
    if len(serving) != 1:
        raise ValueError(f"expected exactly one serving version, found {[v.name for v in serving]}")
    next_id = int(data.get("next_id", 0))
    return max(next_id, max(versions) + 1), versions


class VersionRegistry:
    """The versions of one server, persisted as JSON at ``path``.

    Contract: single writer (the scheduler process); readers in other processes use
    ``read_serving_name`` / ``ServingVersionReader``. Every mutating method has written the file
    atomically (tmp, fsync, ``os.replace``) before it returns. A fresh registry holds ``v0``
    (step 0, serving, no parent) and writes it at construction.
    """

    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self._clock = clock
        if self.path.exists():
            try:
                self._next_id, self._versions = _parse(json.loads(self.path.read_text()))
            except (OSError, ValueError) as e:
                raise VersionFileCorrupt(str(self.path), str(e)) from e
        else:
            v0 = VersionInfo(id=0, step=0, created_at=clock(), state="serving")
            self._next_id, self._versions = 1, {0: v0}
            self._write()

    # -- reading --------------------------------------------------------------------------------
    @property
    def serving(self) -> VersionInfo:
        return next(v for v in self._versions.values() if v.state == "serving")

    @property
    def next_id(self) -> int:
        return self._next_id

    @property
    def total(self) -> int:
        return len(self._versions)

    def get(self, name: str) -> VersionInfo:
        """The version called ``name`` ("v3"); KeyError naming the known range otherwise."""
        vid = _id_of(name)
        if vid is None or vid not in self._versions:
            raise KeyError(f"unknown version {name!r}: this server knows v0..v{self._next_id - 1} "
                           f"({self.total} versions), serving {self.serving.name}")
        return self._versions[vid]

    def lag(self, from_name: str | None, to_name: str) -> int | None:
        """Parent hops from ``to_name`` back to ``from_name``: 0 when equal, None when ``from_name``
        is not an ancestor (another branch, a rejected version, an unknown name, None). A guarded
        version counts as the version it was: it served, and what was minted from it trained from
        its weights; the guard's rollback mints the new serving version from its parent, so it is
        no ancestor of anything after and its recordings are at lag None from then on."""
        if from_name is None:
            return None
        try:
            src, node = self.get(from_name), self.get(to_name)
        except KeyError:
            return None
        if src.id == node.id:
            return 0
        if src.state == "rejected":
            return None
        hops = 0
        while node.parent is not None:
            node = self.get(node.parent)
            hops += 1
            if node.state == "rejected":
                return None
            if node.id == src.id:
                return hops
        return None

    def last_accepted_metric(self) -> float | None:
        """The serving version's held-out metric (None until measured)."""
        return self.serving.metric

    def v0_metric(self) -> float | None:
        return self._versions[0].metric if 0 in self._versions else None

    def page(self, limit: int, offset: int = 0) -> list[VersionInfo]:
        """Versions newest first, ``limit`` of them after skipping ``offset``."""
        newest = sorted(self._versions, reverse=True)[offset:offset + max(limit, 0)]
        return [self._versions[i] for i in newest]

    def status(self, cap: int = 20, ratings: RatingCounts | None = None) -> list[dict[str, Any]]:
        """The newest ``cap`` versions as ``versions`` entries (docs/api.md), newest first, each
        with its thumbs from ``ratings``."""
        return [v.as_status((ratings or {}).get(v.name)) for v in self.page(cap)]

    # -- mutating (each one durable before it returns) ------------------------------------------
    def mint(self, *, step: int, parent: str | None, adapter_path: str | None = None,
             metric: float | None = None, is_rejected: bool = False) -> VersionInfo:
        """A new version with the next id. Accepted: it serves and the previous serving one is
        retired. Rejected (``is_rejected``): recorded as ``rejected``, serving unchanged."""
        if parent is not None:
            self.get(parent)
        v = VersionInfo(id=self._next_id, step=step, created_at=self._clock(),
                        state="rejected" if is_rejected else "serving", metric=metric,
                        adapter_path=adapter_path, parent=parent)
        if not is_rejected:
            old = self.serving
            self._versions[old.id] = dataclasses.replace(old, state="retired")
        self._versions[v.id] = v
        self._next_id += 1
        self._write()
        return v

    def set_metric(self, name: str, metric: float | None) -> VersionInfo:
        return self._put(dataclasses.replace(self.get(name), metric=metric))

    def set_adapter_path(self, name: str, path: str | None) -> VersionInfo:
        return self._put(dataclasses.replace(self.get(name), adapter_path=path))

    def mark_guarded(self, name: str, evidence: dict[str, object]) -> VersionInfo:
        """A retired version the feedback guard rolled back becomes ``guarded``, with the
        ``evidence`` (JSON values) kept on it. ValueError for a version that serves or was
        rejected: a rollback first makes another version serve."""
        v = self.get(name)
        if v.state not in ("retired", "guarded"):
            raise ValueError(f"only a retired version can be marked guarded; {name} is {v.state}")
        return self._put(dataclasses.replace(v, state="guarded", guard=copy.deepcopy(evidence)))

    def _put(self, v: VersionInfo) -> VersionInfo:
        self._versions[v.id] = v
        self._write()
        return v

    # -- checkpoints ----------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """A JSON-able snapshot for the training checkpoint."""
        return {"format": _FORMAT, "serving": self.serving.name, "next_id": self._next_id,
                "versions": [self._versions[i].as_record() for i in sorted(self._versions)]}

    def restore(self, state: dict[str, Any]) -> None:
        """Makes a checkpoint's versions current (Note [restore merges]); ``next_id`` never
        decreases (Note [ids are never reused]). Written before it returns."""
        restored_next, restored = _parse(state)
        merged: dict[int, VersionInfo] = {}
        for vid in sorted(set(self._versions) | set(restored)):
            mine, theirs = self._versions.get(vid), restored.get(vid)
            if theirs is None:
                assert mine is not None
                merged[vid] = dataclasses.replace(
                    mine, state=mine.state if mine.state in ("rejected", "guarded") else "retired")
            elif mine is None:
                merged[vid] = theirs
            else:
                merged[vid] = dataclasses.replace(
                    theirs, metric=theirs.metric if mine.metric is None else mine.metric,
                    adapter_path=theirs.adapter_path if mine.adapter_path is None else mine.adapter_path,
                    guard=mine.guard if mine.guard is not None else theirs.guard,
                    state=("guarded" if mine.state == "guarded" and theirs.state == "retired"
                           else theirs.state))
        self._versions = merged
        self._next_id = max(self._next_id, restored_next)
        self._write()

    def _write(self) -> None:
        atomic_write_bytes(self.path, json.dumps(self.state(), indent=1).encode())


def _id_of(name: str) -> int | None:
    if isinstance(name, str) and len(name) > 1 and name[0] == "v" and name[1:].isdigit():
        return int(name[1:])
    return None


def read_serving_name(path: Path) -> str:
    """The serving version's name in the registry file at ``path``; "v0" when there is none yet.
    For processes other than the writer (e.g. the HTTP process). Raises VersionFileCorrupt."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return "v0"
    except (OSError, ValueError) as e:
        raise VersionFileCorrupt(str(path), str(e)) from e
    if not isinstance(data, dict) or not isinstance(data.get("serving"), str):
        raise VersionFileCorrupt(str(path), "no 'serving' name")
    serving: str = data["serving"]
    return serving


class ServingVersionReader:
    """``read_serving_name`` that re-reads the file only when its identity changes (inode, mtime,
    ctime or size: every atomic write replaces the inode)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._key: tuple[int, ...] | None = None
        self._name = "v0"

    def current(self) -> str:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._key, self._name = None, "v0"
            return self._name
        key = (st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)
        if key != self._key:
            self._name = read_serving_name(self.path)
            self._key = key
        return self._name
