"""A background thread that calls ``poll()`` every ``interval_s`` while inside a ``with`` block.

Owns ``BackgroundPoller``: once on entry, every ``interval_s`` on a daemon thread, once more on
exit (so the last row comes after everything the block did). Subclasses implement ``poll`` (the
status pollers of the ``online`` and ``spike`` experiments). Standard library only.
"""

from __future__ import annotations

import threading
from typing import Any


class BackgroundPoller:
    def __init__(self, interval_s: float, name: str) -> None:
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def poll(self) -> None:
        raise NotImplementedError

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.poll()

    def __enter__(self) -> Any:
        self.poll()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60.0)
        self.poll()
