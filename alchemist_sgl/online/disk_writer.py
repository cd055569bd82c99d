"""Disk writes of the online loop, off the scheduler thread.

Owns ``BackgroundWriter``: one daemon thread that runs submitted write jobs in order (adapter
folders, checkpoints). A job gets only tensors the caller already copied, so the trainer may move
on at once. Each job's completion callback is NOT run on the writer thread: ``drain()`` runs the
callbacks of finished jobs on the caller's (scheduler) thread, where the registry may be touched.
``flush()`` waits for every job (shutdown, rollback, restore). Imports only the standard library.

Note [Writes off the serving path]: an fsync of an adapter folder or a checkpoint takes tens of ms
on these disks, longer than a work unit may take while requests decode. What must be durable
before a version serves (the version registry file) is still written synchronously; the adapter
folder of a version lands shortly after it serves, and its path is recorded once it has landed.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable

from alchemist_sgl.log import get_logger

logger = get_logger(__name__)


class BackgroundWriter:
    def __init__(self) -> None:
        self._jobs: queue.Queue[tuple[Callable[[], Any], Callable[[Any], None] | None] | None] = queue.Queue()
        self._done: queue.Queue[tuple[Callable[[Any], None], Any]] = queue.Queue()
        self._pending = 0
        self._lock = threading.Condition()
        self.failures = 0
        self._thread = threading.Thread(target=self._run, name="alchemist-writer", daemon=True)
        self._thread.start()

    def submit(self, job: Callable[[], Any], on_done: Callable[[Any], None] | None = None) -> None:
        with self._lock:
            self._pending += 1
        self._jobs.put((job, on_done))

    @property
    def pending(self) -> int:
        """Jobs submitted and not finished, plus finished ones whose callbacks have not run."""
        return self._pending + self._done.qsize()

    def drain(self) -> int:
        """Runs the completion callbacks of finished jobs here; returns how many ran."""
        ran = 0
        while True:
            try:
                callback, result = self._done.get_nowait()
            except queue.Empty:
                return ran
            callback(result)
            ran += 1

    def flush(self, timeout_s: float = 60.0) -> None:
        """Waits until every submitted job ran, then drains their callbacks."""
        with self._lock:
            self._lock.wait_for(lambda: self._pending == 0, timeout=timeout_s)
        self.drain()

    def _run(self) -> None:
        while True:
            item = self._jobs.get()
            if item is None:
                return
            job, on_done = item
            try:
                result = job()
                if on_done is not None:
                    self._done.put((on_done, result))
            except Exception:  # a failed write is logged and counted; training goes on
                logger.exception("background write failed")
                self.failures += 1
            finally:
                with self._lock:
                    self._pending -= 1
                    self._lock.notify_all()
