"""Typed errors of alchemist-sgl. Imports nothing of the package."""

from __future__ import annotations


class AlchemistError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(AlchemistError):
    """A config file, override or value is invalid; ``key`` is the dotted name at fault."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(f"config key '{key}': {message}")


class ManifestError(AlchemistError):
    """An SGLang name or environment switch the project depends on is missing or wrong."""


class ModelPrepareError(AlchemistError):
    """An offline model folder could not be built."""


class QueueFull(AlchemistError):
    """The training queue cannot take a whole offer (offers are all-or-nothing); answer 429."""

    def __init__(self, pending: int, offered: int, max_pending: int) -> None:
        self.pending, self.offered, self.max_pending = pending, offered, max_pending
        super().__init__(f"training queue full: {pending} pending + {offered} offered > "
                         f"train.max_pending_samples {max_pending}; retry once a step has run")


class VersionFileCorrupt(AlchemistError):
    """The persisted version registry cannot be read; ``path`` names the file."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        super().__init__(f"version registry {path}: {message}")


class CheckpointIncompatible(AlchemistError):
    """A checkpoint was written for another model or adapter shape; ``fields`` names what differs."""

    def __init__(self, path: str, fields: tuple[str, ...], message: str) -> None:
        self.path, self.fields = path, fields
        super().__init__(message)


class CheckpointCorrupt(AlchemistError):
    """A checkpoint file exists but cannot be loaded; ``path`` names it."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        super().__init__(f"checkpoint {path} cannot be loaded: {message}; move it away to start "
                         "from the previous checkpoint")


class HeldoutInvalid(AlchemistError):
    """The gate's held-out JSONL is unusable; ``path`` and ``line`` (1-based; 0 = the whole file)
    name where."""

    def __init__(self, path: str, line: int, message: str) -> None:
        self.path, self.line = path, line
        where = f", line {line}" if line else ""
        super().__init__(f"held-out set {path}{where}: {message} (publish.gate.heldout_path "
                         "expects one {\"prompt\": str, \"response\": str} object per line)")


class FeedbackInvalid(AlchemistError):
    """A feedback submission is malformed; ``field`` names the field at fault (answer 422)."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"feedback field '{field}': {message}")


class CompletionEntryInvalid(AlchemistError):
    """A completion-log entry cannot be stored; ``field`` names the ``CompletionEntry`` field."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"completion entry field '{field}': {message}")


class FeedbackDbUnavailable(AlchemistError):
    """The feedback database (``feedback.db_path``) cannot be opened as required; ``path`` names it."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        super().__init__(f"feedback database {path}: {message} (feedback.db_path must be a local "
                         "file system that supports SQLite WAL mode)")
