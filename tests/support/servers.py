"""Real `alchemist-sgl serve` processes for tests, on top of the eval harness's ``ManagedServer``.

One server per (config, overrides) per test session (``ServerPool``); tests that must restart or
break a server own a dedicated one (``dedicated_server``). ``ManagedServer`` (eval/server.py) binds
127.0.0.1 on a free port, waits for /health, and stops the whole process group.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Iterator

from eval.server import ManagedServer, ServerStartError

REPO = Path(__file__).resolve().parents[2]
SERVE = [str(REPO / ".venv" / "bin" / "alchemist-sgl"), "serve"]
# One session server for the tests that need small prefill chunks or one running request at a time
# (tests/integration/test_prefix_and_chunking.py, test_online_loop.py): one start serves both.
CHUNKED_ONE_AT_A_TIME = ("sglang.chunked-prefill-size=32", "sglang.max-running-requests=1")
READY_TIMEOUT_S = float(os.environ.get("ALCHEMIST_TEST_READY_TIMEOUT_S", "300"))


class RunningServer:
    """A started server and the OpenAI model name it serves."""

    def __init__(self, managed: ManagedServer, model: str) -> None:
        self.managed = managed
        self.model = model
        self.config = str(managed.config_path)
        self.overrides = managed.overrides
        self.proc: subprocess.Popen = managed.proc  # kept after stop() so tests can read the pid

    @property
    def base_url(self) -> str:
        return self.managed.base_url

    @property
    def port(self) -> int:
        return self.managed.port

    def log_tail(self) -> str:
        return self.managed.log_tail()

    def is_alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        self.managed.stop()


def start_server(config: str, overrides: tuple[str, ...] = (), extra_env: dict[str, str] | None = None,
                 served_model_name: str | None = None) -> RunningServer:
    """Starts `alchemist-sgl serve` and waits until it is healthy; raises with the log tail if not.
    Each server gets its own ``train.checkpoint_dir`` and ``feedback.db_path`` under
    var/test-runs/ unless the overrides name them (a restart test passes the same ones twice)."""
    run = REPO / "var" / "test-runs" / uuid.uuid4().hex[:12]
    if not any(o.startswith("train.checkpoint_dir=") for o in overrides):
        overrides = (*overrides, f"train.checkpoint_dir={run / 'checkpoints'}")
    if not any(o.startswith("feedback.db_path=") for o in overrides):
        overrides = (*overrides, f"feedback.db_path={run / 'feedback.sqlite'}")
    if not any(o.startswith("train.compile=") for o in overrides):
        # The compile costs minutes per server on 2 cores; tests/unit/test_train_compiled.py
        # checks the compiled layers against eager once.
        overrides = (*overrides, "train.compile=false")
    managed = ManagedServer(REPO / config, tuple(overrides),
                            log_dir=Path(tempfile.mkdtemp(prefix="alchemist-server-")),
                            ready_timeout_s=READY_TIMEOUT_S, extra_env=dict(extra_env or {}))
    try:
        managed.start()
    except ServerStartError as exc:
        raise RuntimeError(f"server {config} {overrides} did not start: {exc}") from None
    return RunningServer(managed, served_model_name or _served_name(config, overrides))


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


def _served_name(config: str, overrides: tuple[str, ...]) -> str:
    sys.path.insert(0, str(REPO))
    from alchemist_sgl.config import load_config  # noqa: PLC0415

    return load_config(REPO / config, list(overrides)).server.served_model_name
