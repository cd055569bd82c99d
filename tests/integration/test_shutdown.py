"""Ctrl-C stops the server: SIGINT to its whole process group, as a terminal sends it, ends every
process of the group, and the scheduler writes its shutdown checkpoint on the way out
(alchemist_sgl/integration/shutdown.py, Note [Ctrl-C])."""

from __future__ import annotations

import contextlib
import os
import signal
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator

import psutil

from tests.support.servers import REPO, start_server

TINY = "configs/cpu-tiny.yaml"
STOP_BOUND_S = 60.0  # generous: the scheduler's checkpoint plus SGLang's 15 s exit window


@contextlib.contextmanager
def _sigint_at_default() -> Iterator[None]:
    """Children started meanwhile get SIGINT at its default disposition, as under a terminal (a
    test run from a shell without job control ignores SIGINT, and an ignored signal stays ignored
    across exec)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _group(pgid: int) -> list[psutil.Process]:
    """Live (not zombie) processes of the process group."""
    found = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (ProcessLookupError, psutil.Error):
            continue
    return found


def _wait_for(condition: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return condition()


def test_sigint_to_the_group_stops_every_process_and_checkpoints() -> None:
    folder = REPO / "var" / "test-runs" / uuid.uuid4().hex[:12] / "checkpoints"
    with _sigint_at_default():
        server = start_server(TINY, (f"train.checkpoint_dir={folder}",))
    try:
        pgid = os.getpgid(server.proc.pid)
        names = [" ".join(p.cmdline()) for p in _group(pgid)]
        assert any(n.startswith("sglang::scheduler") for n in names), names
        assert any(n.startswith("sglang::detokenizer") for n in names), names
        assert not list(Path(folder).glob("ckpt-*.pt")), "no checkpoint before the stop"
        os.killpg(pgid, signal.SIGINT)

        def is_gone() -> bool:
            server.proc.poll()  # reaps the main process once it exits
            return not _group(pgid)

        assert _wait_for(is_gone, STOP_BOUND_S), (
            f"left after SIGINT: {[(p.pid, p.name()) for p in _group(pgid)]}\n{server.log_tail()}")
        # The group can look empty before poll() has reaped the main process (a zombie is not
        # listed), so its status is read with wait(), which it has by now.
        assert server.proc.wait(timeout=10) == 130, server.log_tail()  # the exit status of Ctrl-C
        assert list(Path(folder).glob("ckpt-*.pt")), f"no shutdown checkpoint\n{server.log_tail()}"
    finally:
        server.stop()
