"""Starting and stopping real `alchemist-sgl serve` processes for tests.

One server per (config, overrides) per test session (``ServerPool``); tests that must restart or
break a server own a dedicated one (``dedicated_server``). Servers bind 127.0.0.1 on a free port
and are stopped with their whole process group.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[2]
SERVE = [str(REPO / ".venv" / "bin" / "alchemist-sgl"), "serve"]
READY_TIMEOUT_S = float(os.environ.get("ALCHEMIST_TEST_READY_TIMEOUT_S", "300"))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RunningServer:
    config: str
    overrides: tuple[str, ...]
    port: int
    proc: subprocess.Popen
    log_path: Path
    model: str
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "<no log>"

    def is_alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # children (scheduler, detokenizer) too
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)


def start_server(config: str, overrides: tuple[str, ...] = (), extra_env: dict[str, str] | None = None,
                 served_model_name: str | None = None) -> RunningServer:
    """Starts `alchemist-sgl serve` and waits until /health answers; raises with the log tail if not."""
    port = free_port()
    log = Path(tempfile.mkstemp(prefix="alchemist-server-", suffix=".log")[1])
    args = [*SERVE, "--config", str(REPO / config), "--port", str(port)]
    for item in overrides:
        args += ["--set", item]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", **(extra_env or {})}
    with log.open("w") as handle:
        proc = subprocess.Popen(args, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    model = served_model_name or _served_name(config, overrides)
    server = RunningServer(config, tuple(overrides), port, proc, log, model, dict(extra_env or {}))
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if not server.is_alive():
            raise RuntimeError(f"server {config} {overrides} exited with {proc.returncode}:\n{server.log_tail()}")
        if _healthy(server.base_url):
            return server
        time.sleep(1.0)
    server.stop()
    raise RuntimeError(f"server {config} {overrides} not ready in {READY_TIMEOUT_S}s:\n{server.log_tail()}")


@contextlib.contextmanager
def dedicated_server(config: str, overrides: tuple[str, ...] = (), **kwargs: object) -> Iterator[RunningServer]:
    server = start_server(config, overrides, **kwargs)  # type: ignore[arg-type]
    try:
        yield server
    finally:
        server.stop()


class ServerPool:
    """One server per (config, overrides) for the whole session; stopped at session end."""

    def __init__(self) -> None:
        self._servers: dict[tuple[str, tuple[str, ...]], RunningServer] = {}

    def get(self, config: str, overrides: tuple[str, ...] = ()) -> RunningServer:
        key = (config, tuple(overrides))
        server = self._servers.get(key)
        if server is not None and not server.is_alive():
            raise RuntimeError(f"session server {key} died:\n{server.log_tail()}")
        if server is None:
            server = start_server(config, tuple(overrides))
            self._servers[key] = server
        return server

    def stop_all(self) -> None:
        for server in self._servers.values():
            server.stop()
        self._servers.clear()


def _healthy(base_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base_url}/health", timeout=5) as resp:
            return resp.status == 200
    except OSError:
        return False


def _served_name(config: str, overrides: tuple[str, ...]) -> str:
    sys.path.insert(0, str(REPO))
    from alchemist_sgl.config import load_config  # noqa: PLC0415

    return load_config(REPO / config, list(overrides)).server.served_model_name
