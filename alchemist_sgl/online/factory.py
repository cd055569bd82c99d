"""Building the online loop from a config and the live weights (one composition function).

Owns ``build_loop``: trainer over the live ``BaseWeights``, master copy of W0, publisher, sample
queue, version registry and checkpoints under ``train.checkpoint_dir``, the gate's held-out pairs,
and the sample admission; then restores the newest compatible checkpoint (or announces v0) and,
with ``train.compile``, compiles the trainer's layers before serving starts.
Imports package modules only; everything SGLang-specific arrives as arguments.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable

from alchemist_sgl.online import adapters
from alchemist_sgl.online.admission import SampleAdmission
from alchemist_sgl.online.checkpoint import CheckpointMeta, CheckpointStore
from alchemist_sgl.online.gate import load_heldout
from alchemist_sgl.online.intake import SampleQueue
from alchemist_sgl.online.loop import OnlineLoop
from alchemist_sgl.online.publish import MasterWeights, Publisher
from alchemist_sgl.online.versions import VersionRegistry
from alchemist_sgl.train import ReplayTrainer, Sample
from alchemist_sgl.train.offload import SavedTensorOffload
from alchemist_sgl.train.residency import ResidencyAccount
from alchemist_sgl.train.spec import PROJECTIONS
from alchemist_sgl.train.warmup import warm_up_compiled

log = logging.getLogger(__name__)


def build_loop(*, config: Any, weights: Any, host: Any, recordings: Any, completions: Any,
               model_name: str, tokenize: Callable[[str], list[int]],
               chat: Callable[[list[dict[str, str]]], list[int]], eos_id: int | None,
               max_tokens: int, serving: Callable[[], str],
               clock: Callable[[], float] = time.monotonic) -> tuple[OnlineLoop, SampleAdmission]:
    tc = config.train
    folder = Path(tc.checkpoint_dir)
    folder.mkdir(parents=True, exist_ok=True)
    trainer = ReplayTrainer(weights, tc, seed=tc.seed)
    # memory.offload: the work units move their saved tensors (train/offload.py); None: no hooks.
    trainer.residency = (SavedTensorOffload(ResidencyAccount(weights.device))
                         if config.memory.offload else None)
    master = MasterWeights(weights, tuple(tc.lora.targets))
    meta = CheckpointMeta(model=str(model_name), rank=tc.lora.rank, alpha=float(tc.lora.alpha),
                          targets=tuple(tc.lora.targets), dtype=str(weights.dtype).replace("torch.", ""))
    gate_pairs: list[Sample] = []
    if config.publish.gate.is_enabled:
        for prompt, response in load_heldout(config.publish.gate.heldout_path):
            ids = chat([{"role": "user", "content": prompt}])
            out = tokenize(response) + ([eos_id] if eos_id is not None else [])
            gate_pairs.append(Sample(ids, out))
    loop = OnlineLoop(config=config, trainer=trainer, queue=SampleQueue(tc.max_pending_samples, clock),
                      registry=VersionRegistry(folder / "versions.json"),
                      checkpoints=CheckpointStore(folder), checkpoint_meta=meta,
                      publisher=Publisher(master, weights), master=master, host=host,
                      recordings=recordings, adapters=adapters, gate_pairs=gate_pairs, clock=clock)
    loop.restore()
    _compile_before_serving(trainer, config)
    admission = SampleAdmission(
        tokenize=tokenize, chat=chat, eos_id=eos_id, completions=completions,
        pin=recordings.pin if recordings is not None else None,
        unpin=recordings.unpin if recordings is not None else (lambda handle: None),
        serving=serving, max_tokens=max_tokens, clock=clock)
    return loop, admission


def _compile_before_serving(trainer: ReplayTrainer, config: Any) -> None:
    """train.compile: compile the loop's layer graphs now, before the server reports ready
    (train/warmup.py); a failure is logged and training runs eager instead."""
    if not trainer.is_compiled:
        return
    choice = config.record.plan_choice if config.record.is_enabled else "full"
    names = (choice,) if isinstance(choice, str) and choice != "full" else (
        tuple(choice) if isinstance(choice, (tuple, list)) else PROJECTIONS)
    try:
        trainer.compile_info = warm_up_compiled(trainer, names)
        log.info("train.compile: layer graphs compiled in %.1f s (%d warm-up steps)",
                 trainer.compile_info["compile_s"], trainer.compile_info["steps"])
    except Exception as exc:  # noqa: BLE001 - any compiler failure: train eager, loudly
        trainer.is_compiled = False
        trainer.compile_info = {"compile_s": 0.0, "steps": 0, "error": f"{type(exc).__name__}: {exc}"}
        log.error("train.compile failed, training runs eager: %s", trainer.compile_info["error"])
