"""Stopping the server: Ctrl-C (SIGINT) stops every process, and the scheduler checkpoints first.

Note [Ctrl-C]: SGLang stops its engine only on SIGTERM, and only once the tokenizer manager's
event loop exists (its handler asks the scheduler to exit, then kills the children). A SIGINT goes
to uvicorn instead, which stops the HTTP server alone: the main process then waits at exit for its
multiprocessing children (the scheduler and the detokenizer), which nobody told to stop. Pressed
in a terminal, Ctrl-C also reaches the children; a scheduler interrupted in the middle of a step
dies without its shutdown checkpoint (or, started from a shell without job control, ignores it and
runs on). So:
  * every SGLang child process of our server ignores SIGINT (``ignore_sigint_in_children``, from
    ``plugin.load``): the main process alone decides how the engine stops;
  * when uvicorn shuts the application down (SIGINT, or a SIGTERM before SGLang installed its own
    handler), ``with_engine_shutdown``'s lifespan asks the scheduler to exit (``ShutdownReq``: the
    scheduler runs ``Scheduler.handle_shutdown``, where training.py checkpoints), waits up to
    ``SCHEDULER_EXIT_S`` for it, then kills what is left of the children; in-flight requests were
    already answered, since uvicorn waits for open connections before the lifespan ends;
  * ``stop_children`` (after ``launch_server`` returns or raises, e.g. Ctrl-C while the model
    loads) kills whatever children are left, so the process never waits on them at exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import signal
import threading
import time
from typing import Any, AsyncIterator, Callable

from alchemist_sgl.log import get_logger

logger = get_logger(__name__)

SGLANG_NAMES = (
    "sglang.srt.managers.io_struct.ShutdownReq",
    "sglang.srt.managers.tokenizer_manager.TokenizerManager._async_dispatch_to_scheduler",
    "sglang.srt.utils.kill_process_tree",
)
SCHEDULER_EXIT_S = 15.0  # as SGLang's own SIGTERM path waits for the schedulers
_SCHEDULER_TITLE = "sglang::scheduler"  # the process title SGLang gives every scheduler


def ignore_sigint_in_children() -> None:
    """Note [Ctrl-C]: in a multiprocessing child of the server (scheduler, detokenizer), SIGINT is
    ignored; the main process stops the children. A no-op in the main process."""
    if multiprocessing.parent_process() is None or threading.current_thread() is not threading.main_thread():
        return
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def with_engine_shutdown(lifespan: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """SGLang's FastAPI lifespan, with Note [Ctrl-C]'s engine shutdown run when the application
    shuts down, before SGLang's own lifespan cleanup."""

    @contextlib.asynccontextmanager
    async def wrapped(app: Any) -> AsyncIterator[Any]:
        async with lifespan(app) as state:
            try:
                yield state
            finally:
                await _shut_down_engine()

    return wrapped


async def _shut_down_engine() -> None:
    """Asks the schedulers to exit (they checkpoint), waits for them, then kills the children."""
    from sglang.srt.entrypoints import http_server  # noqa: PLC0415
    from sglang.srt.managers.io_struct import ShutdownReq  # noqa: PLC0415

    try:
        schedulers = _schedulers()
        state = http_server._global_state
        if schedulers and state is not None:
            logger.info("stopping: asking %d scheduler(s) to exit", len(schedulers))
            await state.tokenizer_manager._async_dispatch_to_scheduler(ShutdownReq())
            deadline = time.monotonic() + SCHEDULER_EXIT_S
            while time.monotonic() < deadline and any(p.is_running() for p in _schedulers()):
                await asyncio.sleep(0.1)
            left = [p.pid for p in _schedulers()]
            if left:
                logger.warning("schedulers %s still running %.0f s after the shutdown request; "
                               "killing them", left, SCHEDULER_EXIT_S)
    except Exception:
        logger.exception("asking the schedulers to exit failed; killing them")
    finally:
        stop_children()


def stop_children() -> None:
    """Kills this process's children and waits for them (the multiprocessing resource tracker is
    left alone: it cleans up after the main process by itself)."""
    import psutil  # type: ignore[import-untyped]  # noqa: PLC0415
    from sglang.srt.utils import kill_process_tree  # noqa: PLC0415

    tracker = _resource_tracker_pid()
    if not [p for p in psutil.Process().children(recursive=True) if p.pid != tracker]:
        return
    kill_process_tree(os.getpid(), include_parent=False, skip_pid=tracker)


def _schedulers() -> list[Any]:
    import psutil  # type: ignore[import-untyped]  # noqa: PLC0415

    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if " ".join(proc.cmdline()).startswith(_SCHEDULER_TITLE) and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except psutil.Error:
            continue
    return found


def _resource_tracker_pid() -> int | None:
    from multiprocessing import resource_tracker  # noqa: PLC0415

    pid = getattr(resource_tracker._resource_tracker, "_pid", None)
    return pid if isinstance(pid, int) else None
