"""Control commands of the online loop (run on the scheduler thread; see api/control.py).

Owns the handlers behind the admin routes: ``versions.list``, ``versions.rollback``,
``train.pause``, ``train.resume``, ``train.samples``, ``train.replay``, and with debug commands on,
``debug.round_s`` (the round length, for experiments), ``debug.weights`` (writes the live target
tensors and the master copy to a file under the server's ``var/`` folder, for tests),
``debug.checkpoint`` and ``debug.grads``. ``handlers`` returns them by kind; the runtime
(runtime.py) registers them and builds nothing here. A handler raises an error carrying
``http_status`` (and ``field``) for answers other than 200; the runtime passes them to the HTTP
side. Imports package modules only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from alchemist_sgl.errors import QueueFull
from alchemist_sgl.online.admission import AdmissionError, SampleAdmission
from alchemist_sgl.online.loop import OnlineLoop
from alchemist_sgl.online.versions import RatingCounts
from alchemist_sgl.train.lora import peft_name

Handler = Callable[[dict[str, Any]], object]


class CommandError(Exception):
    def __init__(self, message: str, http_status: int, field: str | None = None) -> None:
        super().__init__(message)
        self.http_status, self.field = http_status, field


def handlers(loop: OnlineLoop, admission: SampleAdmission, *, var_dir: Path, is_debug: bool,
             ratings: Callable[[], RatingCounts] = dict) -> dict[str, Handler]:
    """The loop's command handlers by kind; the ``debug.*`` ones only with ``is_debug``.
    ``ratings``: thumbs per version (feedback_guard.py) for the versions list."""
    def versions_list(payload: dict[str, Any]) -> dict[str, Any]:
        limit, offset = int(payload.get("limit", 50)), int(payload.get("offset", 0))
        reg, thumbs = loop.registry, ratings()
        return {"versions": [v.as_status(thumbs.get(v.name)) for v in reg.page(limit, offset)],
                "serving": reg.serving.name, "total": reg.total}

    def rollback(payload: dict[str, Any]) -> dict[str, Any]:
        to = str(payload.get("to", ""))
        try:
            return loop.rollback(to)
        except KeyError as exc:
            raise CommandError(f"unknown version '{to}' (serving {loop.registry.serving.name})",
                               404, "to") from exc
        except LookupError as exc:
            raise CommandError(str(exc), 409, "to") from exc
        except ValueError as exc:
            raise CommandError(str(exc), 409, "to") from exc
        except RuntimeError as exc:
            raise CommandError(str(exc), 503) from exc

    def pause(payload: dict[str, Any]) -> dict[str, Any]:
        loop.is_paused = True
        return {"paused": True}

    def resume(payload: dict[str, Any]) -> dict[str, Any]:
        loop.is_paused = False
        return {"paused": False}

    def samples(payload: dict[str, Any]) -> dict[str, Any]:
        entries = payload.get("samples")
        if not isinstance(entries, list) or not entries:
            raise CommandError("samples: must be a non-empty list", 422, "samples")
        try:
            pending = admission.admit(entries)
        except AdmissionError as exc:
            raise CommandError(str(exc), exc.http_status, exc.field) from exc
        try:
            accepted = loop.offer(pending)
        except QueueFull as exc:
            admission.release(pending)
            raise CommandError(f"the training queue is full ({len(loop.queue)} pending): {exc}",
                               429) from exc
        return {"accepted": accepted, "samples_pending": len(loop.queue)}

    def checkpoint(payload: dict[str, Any]) -> dict[str, Any]:
        loop.checkpoint(is_blocking=True)
        return {"ok": True}

    out: dict[str, Handler] = {
        "versions.list": versions_list, "versions.rollback": rollback, "train.pause": pause,
        "train.resume": resume, "train.samples": samples,
        "train.replay": lambda payload: _set_replay(loop, payload)}
    if is_debug:
        out.update({
            "debug.weights": lambda payload: _dump_weights(loop, payload, var_dir),
            "debug.checkpoint": checkpoint,
            "debug.round_s": lambda payload: _set_round_s(loop, payload),
            "debug.grads": lambda payload: _dump_grads(loop, admission, payload, var_dir)})
    return out


def _set_replay(loop: OnlineLoop, payload: dict[str, Any]) -> dict[str, Any]:
    """``train.replay`` from the next round on (loop.py, Note [Rounds])."""
    enabled = payload.get("enabled")
    if not isinstance(enabled, bool):
        raise CommandError("enabled: must be true or false", 422, "enabled")
    return loop.set_replay(enabled)


def _set_round_s(loop: OnlineLoop, payload: dict[str, Any]) -> dict[str, Any]:
    """``train.round_s`` of this process from now on (the cadence experiment's cells on one
    server); the open round closes by the new value."""
    value = payload.get("round_s")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise CommandError("round_s: must be a number > 0", 422, "round_s")
    loop.round_s = float(value)
    return {"round_s": loop.round_s}


def _dump_weights(loop: OnlineLoop, payload: dict[str, Any], var_dir: Path) -> dict[str, Any]:
    """Writes {live: {layer.proj: tensor}, master: {...}, adapter: peft state, published: ...}."""
    name = Path(str(payload.get("name") or "weights.pt")).name  # a file name, never a path
    target = var_dir / "debug" / name
    target.parent.mkdir(parents=True, exist_ok=True)
    live = {f"{i}.{p}": lw.projection(p).detach().clone()
            for i, lw in enumerate(loop.publisher.live.layers) for p in loop.master.projections}
    master = {f"{i}.{p}": t.clone() for i, layer in enumerate(loop.master.tensors) for p, t in layer.items()}
    trainer = loop.trainer
    published = trainer.published.peft_state_dict() if trainer.published is not None else None
    torch.save({"live": live, "master": master, "adapter": trainer.adapter.peft_state_dict(),
                "published": published, "scale": trainer.adapter.scale,
                "serving": loop.registry.serving.name}, target)
    return {"path": str(target.resolve())}


def _dump_grads(loop: OnlineLoop, admission: SampleAdmission, payload: dict[str, Any], var_dir: Path) -> dict[str, Any]:
    """Loss and LoRA gradients of one sample through the loop's own path (admission, pins, lag,
    one sample of a round in work units over the live weights), without the optimizer unit; for
    equivalence tests. The open round's gradients are kept aside and put back.
    Training must be idle (pause it first)."""
    if loop.has_step_in_progress:
        raise CommandError("a training step is under way; pause training and retry", 503)
    name = Path(str(payload.get("name") or "grads.pt")).name
    pending = admission.admit([payload["sample"]])
    trainer = loop.trainer
    own = list(trainer.adapter.parameters())
    kept = [p.grad for p in own]  # the open round's gradients (loop.py, Note [Rounds])
    try:
        trainer.version = loop.counters.train_state
        sample = loop._to_sample(pending[0])
        run = trainer.begin_round()  # the loop's path: one sample of a round, all but the optimizer
        units = run.add(sample)
        while not units.is_done:
            units.run_unit()
        scale = 1.0 / run.weight_sum  # train/rounds.py, Note [Round normalisation]
        adapter = trainer.adapter
        grads = {}
        for layer in range(adapter.spec.layers):
            for t in adapter.targets:
                for which, params in (("A", adapter.a), ("B", adapter.b)):
                    g = params[f"{layer}_{t}"].grad
                    grads[peft_name(layer, t, which)] = (
                        None if g is None else g.detach() * scale)
        counts = run.last_counts
        loss = float(torch.stack(run._losses).sum()) * scale
        result = {"loss": loss, "grads": grads, "adapter": adapter.peft_state_dict(),
                  "rank": adapter.rank, "alpha": adapter.alpha,
                  "prompt_ids": list(sample.prompt_ids), "response_ids": list(sample.response_ids),
                  "replayed_tokens": counts.replayed_tokens,
                  "recomputed_tokens": counts.recomputed_tokens,
                  "stale_recomputes": counts.stale_recomputes, "graph_samples": counts.graph_samples,
                  "reuse_by_lag": dict(counts.reuse_by_lag), "serving": loop.registry.serving.name}
        run.abandon()
    finally:
        admission.release(pending)
        for p, g in zip(own, kept):
            p.grad = g
    target = var_dir / "debug" / name
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(result, target)
    return {"path": str(target.resolve()), "replayed_tokens": result["replayed_tokens"],
            "recomputed_tokens": result["recomputed_tokens"],
            "stale_recomputes": result["stale_recomputes"], "loss": result["loss"],
            "graph_samples": result["graph_samples"]}
