"""Training checkpoints: every piece of loop state in one file per step, written atomically.

Owns ``CheckpointMeta`` (what a checkpoint must match to be resumed: model, LoRA shape, dtype) and
``CheckpointStore`` (``ckpt-{step:08d}.pt`` files in one folder, the newest two kept). What goes in
``state`` is the caller's (adapter, AdamW state, version registry state, pending samples, counters);
it must hold only tensors, numbers, strings, None and lists/dicts of them (``torch.load`` runs with
``weights_only=True``). Imports only the standard library, torch and ``alchemist_sgl.errors``;
never sglang or alchemist_sgl.train.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch

from alchemist_sgl.errors import CheckpointCorrupt, CheckpointIncompatible
from alchemist_sgl.online.atomic import atomic_write

_NAME = re.compile(r"^ckpt-(\d{8})\.pt$")
_FORMAT = 1


@dataclass(frozen=True)
class CheckpointMeta:
    """What must match for a checkpoint to resume: the model, the LoRA shape, the training dtype."""

    model: str
    rank: int
    alpha: float
    targets: tuple[str, ...]
    dtype: str

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "rank": self.rank, "alpha": float(self.alpha),
                "targets": list(self.targets), "dtype": self.dtype}


_PHRASES = {"model": ("for model {}", "this server trains {}"),
            "rank": ("for rank {}", "this server trains rank {}"),
            "alpha": ("for alpha {}", "this server trains alpha {}"),
            "targets": ("for targets {}", "this server trains targets {}"),
            "dtype": ("in dtype {}", "this server trains in {}")}


class CheckpointStore:
    """``ckpt-{step:08d}.pt`` files in ``folder`` (``train.checkpoint_dir``).

    Contract: one writer per folder. ``save`` is durable before it returns (tmp file, flush,
    fsync, ``os.replace``, fsync of the folder); files that do not match the name pattern (tmp
    files a crash left behind) are ignored by ``load_latest`` and removed by the next ``save``.
    """

    keep = 2

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def path_for(self, step: int) -> Path:
        return self.folder / f"ckpt-{step:08d}.pt"

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints present, ascending."""
        if not self.folder.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.folder.iterdir()
                      if (m := _NAME.match(p.name)) and p.is_file())

    def save(self, step: int, state: dict[str, Any], meta: CheckpointMeta) -> Path:
        """Writes ``state`` for ``step`` and prunes to the newest ``keep``; returns the path."""
        if step < 0:
            raise ValueError(f"checkpoint step must be >= 0, got {step}")
        self.folder.mkdir(parents=True, exist_ok=True)
        for p in self.folder.glob(".ckpt-*.tmp*"):
            p.unlink(missing_ok=True)
        path = self.path_for(step)
        payload = {"format": _FORMAT, "step": step, "meta": meta.as_dict(), "state": state}
        def write(f: IO[bytes]) -> None:
            torch.save(payload, f)

        atomic_write(path, write)
        for old in self.steps()[:-self.keep]:
            self.path_for(old).unlink(missing_ok=True)
        return path

    def load_latest(self, meta: CheckpointMeta) -> dict[str, Any] | None:
        """The newest checkpoint's ``state``, or None when there is none.

        Raises ``CheckpointIncompatible`` naming every field of ``meta`` that differs, and
        ``CheckpointCorrupt`` when the file cannot be read.
        """
        steps = self.steps()
        if not steps:
            return None
        path = self.path_for(steps[-1])
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many kinds here; re-raised typed, naming the file
            raise CheckpointCorrupt(str(path), f"{type(e).__name__}: {e}") from e
        if not isinstance(payload, dict) or "state" not in payload:
            raise CheckpointCorrupt(str(path), "not a checkpoint written by CheckpointStore")
        self._check(path, payload.get("meta") or {}, meta)
        state: dict[str, Any] = payload["state"]
        return state

    @staticmethod
    def _check(path: Path, found: dict[str, Any], meta: CheckpointMeta) -> None:
        want = meta.as_dict()
        differ = tuple(f.name for f in dataclasses.fields(CheckpointMeta)
                       if found.get(f.name) != want[f.name])
        if not differ:
            return
        clauses = "; ".join(f"{_PHRASES[k][0].format(found.get(k, '(missing)'))}, "
                            f"{_PHRASES[k][1].format(want[k])}" for k in differ)
        raise CheckpointIncompatible(
            str(path), differ, f"checkpoint {path} was written {clauses}: move the folder away "
                               "or set train.checkpoint_dir")
