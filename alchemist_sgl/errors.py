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


class StandInNotImplemented(AlchemistError, NotImplementedError):
    """A CPU stand-in under patches/ was called for a function it does not provide."""
