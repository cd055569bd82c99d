"""A settable, thread-safe clock for eval tests whose fakes (server, feeder, experiment) share time.

Imports only the standard library.
"""

from __future__ import annotations

import threading


class Clock:
    """A settable clock shared by the fake server, the feeder and the experiment."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t
        self.lock = threading.Lock()

    def __call__(self) -> float:
        with self.lock:
            return self.t

    def advance(self, s: float) -> None:
        with self.lock:
            self.t += s
