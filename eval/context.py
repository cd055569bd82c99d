"""``RunContext``: what the harness hands to an experiment's ``run(ctx)`` (contract in
``eval/experiments/__init__.py``).

Owns the per-run facts (name, config, dataset, url, out_dir, quick, seed), the ``server`` context
manager that starts/stops managed servers (or yields ``--url``), workload loading, load sessions
with monitoring, and the record of every server used (resolved config, port, readiness, CPU,
state folder) that ends up in the result's ``meta``. Every server it starts keeps its state under
``out_dir/state/server-K/`` (K counts the run's servers; ``eval/server.py``, ``STATE_KEYS``), or
where the experiment's overrides say, which must also be under ``out_dir``: a benchmark never
writes the ``var/`` state a user's ``make run`` resumes. Must not import the server runtime or sglang; the pure
``alchemist_sgl.config`` is used only to record resolved configs.
"""

from __future__ import annotations

import contextlib
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from eval.loadgen.feedback import FeedbackPolicy
from eval.loadgen.runner import LoadResult, LoadSpec, run_load_sync
from eval.loadgen.stats import latency_samples
from eval.loadgen.workloads import Conversation, default_workload, load_workload, prompt_heavy
from eval.monitor import Monitor, merge_timelines, throughput_timeline
from eval.server import STATE_KEYS, ManagedServer, validate_overrides


def resolve_config(config_path: Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The fully resolved config as a dict (``alchemist_sgl.config``), or why it could not be."""
    try:
        from alchemist_sgl.config import config_to_dict, load_config  # pure module, no runtime
    except ImportError as exc:
        return {"unresolved": f"alchemist_sgl.config unavailable: {exc}", "path": str(config_path)}
    try:
        return config_to_dict(load_config(config_path, list(overrides)))
    except Exception as exc:  # noqa: BLE001 - a config error is recorded; starting the server reports it loudly
        return {"unresolved": "".join(traceback.format_exception_only(exc)).strip(), "path": str(config_path)}


def check_state_under(resolved: dict[str, Any], root: Path) -> None:
    """Raises ``ValueError`` naming the first state key (``STATE_KEYS``) of a resolved config whose
    path is not under ``root`` (a relative path counts from the current folder, as the server
    started from here resolves it). An unresolved config is left to the server to refuse."""
    if "unresolved" in resolved:
        return
    top = root.resolve()
    for key in STATE_KEYS:
        section, name = key.split(".", 1)
        value = str(resolved[section][name])
        if not Path(value).resolve().is_relative_to(top):
            raise ValueError(f"{key}={value} is outside this run's folder {top}: a server that eval "
                             "starts keeps its state under the run's folder, never in the var/ "
                             "state that `make run` resumes")


@dataclass
class RunContext:
    name: str
    config_path: Path
    dataset_path: Path | None
    url: str | None
    out_dir: Path
    quick: bool
    seed: int = 0
    progress: bool = True
    workload_name: str = "chitchat"  # --workload: chitchat | prompt-heavy
    feedback_delay_s: float = 0.0  # --feedback-delay: mean delay of simulated users' feedback
    rate_rps: float | None = None  # --rate: the request rate of online/cadence (None: their default)
    round_s: float | None = None  # --round-s: online's train.round_s (None: its default)
    smoke: bool = False  # --smoke: online/spike/serving's shortest end-to-end run (tests, tiny model)
    servers: list[dict[str, Any]] = field(default_factory=list)
    last_timeline: list[dict[str, float]] = field(default_factory=list, repr=False)
    _pids: dict[str, int] = field(default_factory=dict, repr=False)

    @contextlib.contextmanager
    def server(self, config_path: str | Path | None = None, overrides: Sequence[str] = ()) -> Iterator[str]:
        """Yields a base URL (``http://127.0.0.1:PORT``, no ``/v1``). With ``--url`` it yields that URL
        and ignores ``config_path``/``overrides`` (recorded as ignored). Otherwise starts
        ``alchemist-sgl serve --config (config_path or ctx.config_path) --port N --set ...``, waits
        for health, and stops the process group on exit. The server's state goes under
        ``out_dir/state/server-K/`` unless ``overrides`` name a state key (under ``out_dir`` too,
        else ``ValueError``)."""
        cfg = Path(config_path) if config_path is not None else self.config_path
        overrides = validate_overrides(overrides)
        if self.url is not None:
            self.servers.append({"url": self.url, "external": True, "ignored_config_path": str(cfg),
                                 "ignored_overrides": list(overrides)})
            yield self.url
            return
        srv = ManagedServer(cfg, overrides, log_dir=self.out_dir / "logs",
                            state_dir=self.out_dir / "state" / f"server-{len(self.servers)}")
        resolved = resolve_config(cfg, srv.overrides)
        check_state_under(resolved, self.out_dir)
        entry: dict[str, Any] = {"resolved_config": resolved}
        self.servers.append(entry)
        try:
            url = srv.start()
            self._pids[url] = srv.proc.pid if srv.proc else -1
            yield url
        finally:
            self._pids.pop(srv.base_url, None)
            srv.stop()
            entry.update(srv.describe())

    def workload(self, min_turns: int = 2) -> list[Conversation]:
        """``--dataset-path`` (ShareGPT, chitchat or MT-Bench file) or the packaged default; with
        ``--workload prompt-heavy``, single-turn long prompts built from those conversations."""
        if self.dataset_path is not None:
            convs = load_workload(self.dataset_path)
        else:
            convs = default_workload(min_turns=min_turns, seed=self.seed)
        if self.workload_name == "prompt-heavy":
            return prompt_heavy(convs, seed=self.seed)
        if self.workload_name != "chitchat":
            raise ValueError(f"unknown workload {self.workload_name!r} (chitchat | prompt-heavy)")
        return convs

    def load(
        self, base_url: str, workload: Sequence[Conversation], spec: LoadSpec,
        feedback: FeedbackPolicy | None = None, poll_status: bool = False,
    ) -> LoadResult:
        """One monitored load session; ``self.last_timeline`` then holds its throughput and the
        server's memory over time (memory only for servers this context started; with
        ``poll_status`` also store bytes and train steps from ``/alchemist/status``)."""
        with Monitor(self._pids.get(base_url), status_url=base_url if poll_status else None) as mon:
            result = run_load_sync(base_url, workload, spec, feedback=feedback, progress=self.progress)
        bin_s = max(1.0, result.wall_s / 30.0)  # ~30 points, whatever the session length
        self.last_timeline = merge_timelines(throughput_timeline(result.records, bin_s), mon.samples)
        return result


def samples_of(result: LoadResult) -> dict[str, list[float]]:
    """``latency_samples`` entry for the report's CDF plots."""
    return latency_samples(result.records)
