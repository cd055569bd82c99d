"""Starting and stopping an ``alchemist-sgl serve`` process for an experiment, and cache flushing.

Owns ``ManagedServer``: picks a free 127.0.0.1 port, runs ``.venv/bin/alchemist-sgl serve
--config FILE --port N --set a.b=c ...`` in its own process group (stdout/stderr to a log file),
waits until ``GET /health`` answers 200 (and ``/v1/models`` lists a model), and on stop sends
SIGTERM then SIGKILL to the whole group, so SGLang's scheduler and detokenizer go too. Given a
``state_dir``, the server keeps its state there (``STATE_KEYS``: checkpoints, adapters, versions,
feedback and completion database), never in the ``var/`` folder a user's ``make run`` resumes.
Also owns ``flush_cache`` (SGLang's ``POST /flush_cache`` answers 400 while requests run: retry
until 200).
Must not import the server runtime or sglang: it only spawns the CLI and talks HTTP.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import httpx
import psutil


# The config keys under which a server keeps state that outlives it, each with its name inside a
# state folder: train.checkpoint_dir holds the checkpoints, versions.json and adapters/;
# feedback.db_path the feedback and completion log. The two travel together: a fresh checkpoint
# folder over an older database gives every row trained after its step 0 back to training
# (feedback/ratings.py, Note [exactly once]), with completions of the other server's versions.
# (The control queue is a fresh temporary file per server process tree; nothing resumes it.)
STATE_KEYS: dict[str, str] = {"train.checkpoint_dir": "checkpoints", "feedback.db_path": "feedback.sqlite"}


def with_state_dir(overrides: Sequence[str], state_dir: Path) -> tuple[str, ...]:
    """``overrides`` plus ``KEY=state_dir/NAME`` for each state key they do not name already."""
    named = {item.split("=", 1)[0].strip() for item in overrides}
    return (*overrides, *(f"{key}={state_dir / name}" for key, name in STATE_KEYS.items() if key not in named))


class ServerStartError(RuntimeError):
    """The server exited or did not become healthy in time; the message ends with its log tail."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def serve_command() -> list[str]:
    """The ``alchemist-sgl`` entry point next to this interpreter (the repo's .venv), else on PATH."""
    local = Path(sys.executable).parent / "alchemist-sgl"
    if local.exists():
        return [str(local)]
    found = shutil.which("alchemist-sgl")
    if found is None:
        raise ServerStartError("alchemist-sgl is not installed in this environment (run `make setup`)")
    return [found]


def wait_healthy(base_url: str, timeout_s: float, proc: subprocess.Popen | None = None,
                 api_key: str | None = None) -> float:
    """Blocks until ``/health`` answers 200 and ``/v1/models`` lists a model; returns seconds waited.
    ``api_key``: the server's ``--api-key``, sent as a bearer token to ``/v1/models``."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if proc is not None and proc.poll() is not None:
            raise ServerStartError(f"server exited with code {proc.returncode} before becoming healthy")
        try:
            if httpx.get(f"{base_url}/health", timeout=5.0).status_code == 200:
                models = httpx.get(f"{base_url}/v1/models", timeout=5.0, headers=headers)
                if models.status_code == 200 and models.json().get("data"):
                    return time.monotonic() - start
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise ServerStartError(f"{base_url} not healthy after {timeout_s:.0f} s")


def flush_cache(base_url: str, timeout_s: float = 120.0, interval_s: float = 0.25) -> int:
    """Flushes SGLang's radix cache, retrying while it refuses (requests still running).
    Returns the number of attempts; raises ``TimeoutError`` if it never answers 200."""
    deadline = time.monotonic() + timeout_s
    attempts = 0
    while True:
        attempts += 1
        try:
            if httpx.post(f"{base_url}/flush_cache", timeout=30.0).status_code == 200:
                return attempts
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{base_url}/flush_cache did not answer 200 in {timeout_s:.0f} s ({attempts} tries)")
        time.sleep(interval_s)


def _tree(pid: int) -> list[psutil.Process]:
    """``pid`` and its live descendants ([] when gone)."""
    try:
        root = psutil.Process(pid)
        return [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def tree_cpu_s(pid: int) -> float:
    """User+system CPU seconds of ``pid`` and its live descendants (0 when gone)."""
    total = 0.0
    for p in _tree(pid):
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` and its live descendants, in bytes."""
    total = 0
    for p in _tree(pid):
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


@dataclass
class ManagedServer:
    """One server process owned by an experiment. ``start`` then ``stop`` (always, in finally)."""

    config_path: Path
    overrides: tuple[str, ...] = ()
    log_dir: Path = Path(".")
    ready_timeout_s: float = 900.0  # train.compile compiles before ready: minutes on 2 cores
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    ready_s: float | None = None
    cpu_s_at_stop: float | None = None
    extra_env: dict[str, str] = field(default_factory=dict)  # added to the server's environment
    # Where the server keeps its state (``with_state_dir``, made absolute); None: the config's own.
    state_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.state_dir is not None:
            self.state_dir = self.state_dir.resolve()
            self.overrides = with_state_dir(self.overrides, self.state_dir)

    @property
    def api_key(self) -> str | None:
        """The ``sglang.api-key`` override, if any (readiness checks send it)."""
        for item in self.overrides:
            key, _, value = item.partition("=")
            if key.strip() in ("sglang.api-key", "sglang.api_key"):
                return value
        return None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"server-{self.port}.log"

    def command(self) -> list[str]:
        cmd = serve_command() + ["serve", "--config", str(self.config_path), "--port", str(self.port)]
        for item in self.overrides:
            cmd += ["--set", item]
        return cmd

    def start(self) -> str:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", **self.extra_env)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=env,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            self.ready_s = wait_healthy(self.base_url, self.ready_timeout_s, self.proc,
                                        api_key=self.api_key)
        except ServerStartError as exc:
            self.stop()
            raise ServerStartError(f"{exc}\ncommand: {' '.join(self.command())}\n--- {self.log_path} (tail) ---\n"
                                   f"{self.log_tail()}") from None
        return self.base_url

    def log_tail(self, n_bytes: int = 4000) -> str:
        try:
            return self.log_path.read_bytes()[-n_bytes:].decode("utf-8", "replace")
        except OSError:
            return "(no log)"

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM to the server's main process, then SIGKILL to whatever is left of its process
        group after ``grace_s``; idempotent. The main process alone is signalled first: it drains,
        asks the scheduler to exit (the scheduler checkpoints on the way out) and stops its own
        children. A SIGTERM to the whole group would kill the scheduler mid-way instead: no final
        checkpoint, and SGLang's crash path waits 5 s for diagnostics before it exits."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.cpu_s_at_stop = tree_cpu_s(self.proc.pid)
        try:
            pgid: int | None = os.getpgid(self.proc.pid)
        except ProcessLookupError:
            pgid = None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
        if pgid is not None:
            try:  # children may outlive the leader: kill whatever is left of the group
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=30)
        self.proc = None

    def describe(self) -> dict[str, object]:
        return {"config_path": str(self.config_path), "overrides": list(self.overrides), "port": self.port,
                "ready_s": self.ready_s, "cpu_s": self.cpu_s_at_stop, "log": str(self.log_path),
                "state_dir": str(self.state_dir) if self.state_dir is not None else None}


def validate_overrides(overrides: Sequence[str]) -> tuple[str, ...]:
    """Validates ``a.b=c`` items (typed error naming the bad one)."""
    for item in overrides:
        if "=" not in item or not item.split("=", 1)[0].strip():
            raise ValueError(f"override {item!r} is not of the form a.b=c")
    return tuple(overrides)
