"""One logging entry point for the package: ``get_logger(__name__)``. Imports nothing of the package."""

from __future__ import annotations

import logging
import os

_FORMAT = "[%(asctime)s %(process)d %(name)s] %(levelname)s %(message)s"


def get_logger(name: str) -> logging.Logger:
    """Returns the named logger; configures a stderr handler once for the ``alchemist_sgl`` tree."""
    root = logging.getLogger("alchemist_sgl")
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(_FORMAT))
        root.addHandler(handler)
        root.setLevel(os.environ.get("ALCHEMIST_LOG_LEVEL", "INFO").upper())
        root.propagate = False
    return logging.getLogger(name)
