"""Published adapters on disk: one PEFT folder per version, and which folders to prune.

Owns ``save_adapter`` / ``load_adapter`` (PEFT's layout: ``adapter_model.safetensors`` +
``adapter_config.json``, plus ``optimizer.pt`` with the AdamW state so a rollback resumes exactly)
and the pure ``prune_plan`` (``publish.keep_adapters_last`` / ``publish.keep_adapters_every``).
Imports only the standard library, torch and safetensors; never peft, sglang, or
alchemist_sgl.train (the caller hands over PEFT names and the PEFT config dict).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from alchemist_sgl.online.atomic import fsync_tree, replace_folder

WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
OPTIMIZER_FILE = "optimizer.pt"


def save_adapter(folder: Path, peft_state: dict[str, torch.Tensor], peft_config: dict[str, Any],
                 optimizer_state: dict[str, Any] | None, base_model: str) -> Path:
    """Writes a PEFT adapter folder at ``folder``, replacing one that exists; returns ``folder``.

    ``peft_state`` maps PEFT names (``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight``)
    to A [r, d_in] / B [d_out, r] tensors on any device; they are saved as CPU copies under exactly
    those names. ``adapter_config.json`` = ``peft_config`` + ``base_model_name_or_path``. Atomic:
    everything is written and fsynced in a tmp folder next to ``folder`` and then renamed.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp.{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in peft_state.items()}
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        config = {**peft_config, "base_model_name_or_path": base_model}
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=1, sort_keys=True))
        if optimizer_state is not None:
            torch.save(optimizer_state, tmp / OPTIMIZER_FILE)
        fsync_tree(tmp)
        replace_folder(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def load_adapter(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """(PEFT-named CPU tensors, optimizer state or None) from a folder ``save_adapter`` wrote."""
    folder = Path(folder)
    peft_state = load_file(str(folder / WEIGHTS_FILE), device="cpu")
    opt_path = folder / OPTIMIZER_FILE
    optimizer_state: dict[str, Any] | None = (
        torch.load(opt_path, map_location="cpu", weights_only=True) if opt_path.exists() else None)
    return peft_state, optimizer_state


def load_adapter_config(folder: Path) -> dict[str, Any]:
    """The ``adapter_config.json`` of a saved adapter folder."""
    config: dict[str, Any] = json.loads((Path(folder) / CONFIG_FILE).read_text())
    return config


def prune_plan(version_ids: list[int], keep_last: int, keep_every: int,
               protected: set[int]) -> set[int]:
    """Ids whose adapter folders may be deleted: all but the newest ``keep_last``, the ids with
    ``id % keep_every == 0``, and ``protected`` (e.g. the serving version, a rollback target)."""
    ids = sorted(set(version_ids))
    keep = set(ids[-keep_last:]) if keep_last > 0 else set()
    if keep_every > 0:
        keep |= {i for i in ids if i % keep_every == 0}
    return set(ids) - keep - set(protected)
