"""Sampling the machine and the server over time, and describing the environment of a run.

Owns ``Monitor`` (a background thread sampling, every ``interval_s``: the server process tree's
resident memory and CPU seconds, the 1-minute load average, and optionally a few numbers of
``GET /alchemist/status``: store bytes, train steps and pending samples), ``throughput_timeline`` (per-bin
request and output-token throughput from request records) and ``environment`` / ``machine_load``
(package versions, git commit, CPU count, load averages, CPU/wall times) recorded next to every
result. Must not import the server runtime or sglang (versions come from package metadata).
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import resource
import subprocess
import threading
import time
from typing import Any, Sequence

import httpx

from eval.server import tree_cpu_s, tree_rss_bytes

PACKAGES = ("alchemist-sgl", "sglang", "torch", "transformers", "openai", "numpy", "httpx")


class Monitor:
    """``with Monitor(pid) as m: ...`` then ``m.samples``: ``[{t_s, rss_bytes, cpu_s, load1}]``.
    ``pid`` None samples only the load average (e.g. a server given by ``--url``). With
    ``status_url`` (a base URL) rows also get ``store_bytes``, ``train_steps``,
    ``train_samples_pending`` from ``/alchemist/status`` when it answers (off by default: each
    poll is a round trip through the scheduler)."""

    def __init__(self, pid: int | None, interval_s: float = 1.0, status_url: str | None = None) -> None:
        self.pid = pid
        self.status_url = status_url
        self.interval_s = interval_s
        self.samples: list[dict[str, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="eval-monitor", daemon=True)
        self._t0 = 0.0

    def _sample(self) -> None:
        row: dict[str, float] = {"t_s": time.perf_counter() - self._t0, "load1": os.getloadavg()[0]}
        if self.pid is not None:
            row["rss_bytes"] = float(tree_rss_bytes(self.pid))
            row["cpu_s"] = tree_cpu_s(self.pid)
        if self.status_url is not None:
            row.update(_status_numbers(self.status_url))
        self.samples.append(row)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> "Monitor":
        self._t0 = time.perf_counter()
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def _status_numbers(base_url: str) -> dict[str, float]:
    try:
        resp = httpx.get(f"{base_url}/alchemist/status", timeout=2.0)
        status = resp.json() if resp.status_code == 200 else {}
    except (httpx.HTTPError, ValueError):
        return {}
    out: dict[str, float] = {}
    for key, (section, field) in {"store_bytes": ("store", "bytes_stored"), "train_steps": ("train", "steps"),
                                  "train_samples_pending": ("train", "samples_pending")}.items():
        value = (status.get(section) or {}).get(field) if isinstance(status, dict) else None
        if isinstance(value, (int, float)):
            out[key] = float(value)
    return out


def throughput_timeline(records: Sequence[dict[str, Any]], bin_s: float = 1.0) -> list[dict[str, float]]:
    """Completed requests/s and output tokens/s per ``bin_s`` bin of completion time (seconds
    from the session start), for successful requests."""
    ends = [(r["start_s"] + r["e2e_s"], int(r.get("output_tokens") or 0))
            for r in records if r.get("error") is None and r.get("start_s") is not None]
    if not ends:
        return []
    n_bins = int(max(t for t, _ in ends) // bin_s) + 1
    reqs = [0] * n_bins
    toks = [0] * n_bins
    for t, n in ends:
        reqs[int(t // bin_s)] += 1
        toks[int(t // bin_s)] += n
    return [{"t_s": (i + 1) * bin_s, "request_rps": reqs[i] / bin_s, "output_tps": toks[i] / bin_s} for i in range(n_bins)]


def merge_timelines(throughput: list[dict[str, float]], samples: list[dict[str, float]]) -> list[dict[str, float]]:
    """One time-sorted list holding both kinds of rows (the report plots each key it finds)."""
    return sorted(list(throughput) + list(samples), key=lambda r: r["t_s"])


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit() -> str | None:
    try:
        res = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if res.returncode != 0:
        return None
    return res.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def machine_load() -> dict[str, Any]:
    """Load averages now and this process's (and its waited-for children's) CPU seconds."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "loadavg": list(os.getloadavg()),
        "harness_cpu_s": me.ru_utime + me.ru_stime,
        "children_cpu_s": kids.ru_utime + kids.ru_stime,
        "wall_clock": time.time(),
    }


def environment() -> dict[str, Any]:
    return {
        "packages": package_versions(),
        "git_commit": git_commit(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "gpu": gpu_name(),
        "platform": platform.platform(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def gpu_name() -> str | None:
    """The first CUDA device's name, None without one."""
    import torch  # noqa: PLC0415 - the harness has it loaded already

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
