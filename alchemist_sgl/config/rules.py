"""How a config section declares and checks its keys: ``key(default, rule)`` and ``Section``.

Owns the field spec (a dataclass field whose metadata carries one ``Rule``), the common rules
(``at_least``, ``above``, ``within``, ``or_null``), the ``Section`` base class whose ``validate``
walks a section's fields (nested sections included), and the YAML spelling of field names.
Adding a key to a section is one line there: ``name: type = key(default, rule)``.
Must not import sglang, torch or any package module but ``errors``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator, TypeVar

from alchemist_sgl.errors import ConfigError

T = TypeVar("T")

_RULE = "alchemist_rule"  # the metadata entry of a field that carries its Rule

# YAML spells booleans as ``enabled`` (docs/configuration.md); the dataclasses say ``is_enabled``.
_ALIASES = {"enabled": "is_enabled"}
_REVERSE_ALIASES = {v: k for k, v in _ALIASES.items()}


def python_name(yaml_key: str) -> str:
    """The dataclass field that a YAML key names."""
    return _ALIASES.get(yaml_key, yaml_key)


def yaml_name(field_name: str) -> str:
    """The YAML key of a dataclass field (the spelling error messages and records use)."""
    return _REVERSE_ALIASES.get(field_name, field_name)


@dataclass(frozen=True)
class Rule:
    """A check on one value that types alone do not express; ``message`` says what it needs."""

    holds: Callable[[Any], bool]
    message: str
    is_value_shown: bool = False  # the message ends with ", got <value>"

    def refusal(self, value: object) -> str:
        return f"{self.message}, got {value!r}" if self.is_value_shown else self.message


def key(default: T, rule: Rule | None = None) -> T:
    """A section field with an immutable ``default`` checked by ``rule`` at load time."""
    return field(default=default, metadata={_RULE: rule})


def _number(value: float) -> str:
    return f"{value:g}"


def at_least(low: float, why: str = "") -> Rule:
    return Rule(lambda v: v >= low, f"must be >= {_number(low)}{why}")


def above(low: float) -> Rule:
    return Rule(lambda v: v > low, f"must be > {_number(low)}")


def within(low: float, high: float, brackets: str = "[]") -> Rule:
    """``low <= v <= high`` with ``brackets`` "[]", "[)" or "(]" saying which ends are open."""
    is_low_open, is_high_open = brackets[0] == "(", brackets[1] == ")"

    def holds(v: float) -> bool:
        return (low < v if is_low_open else low <= v) and (v < high if is_high_open else v <= high)

    return Rule(holds, f"must be in {brackets[0]}{_number(low)}, {_number(high)}{brackets[1]}")


def or_null(rule: Rule, meaning: str) -> Rule:
    """``rule``, or null, which means ``meaning``."""
    return Rule(lambda v: v is None or rule.holds(v), f"{rule.message} (or null: {meaning})")


class Section:
    """A config section: a frozen dataclass of ``key(...)`` fields and nested sections.

    ``validate`` is the server's startup check. It refuses what the online loop cannot run, so
    code that builds a section directly (the trainer API, tests) is free to skip it.
    """

    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]  # set by @dataclass

    def validate(self, prefix: str = "") -> None:
        """Raises ConfigError naming the dotted key (``prefix`` + YAML name) of the first refused
        value: each field's rule in field order, nested sections in place, then ``problems``."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            dotted = prefix + yaml_name(f.name)
            if isinstance(value, Section):
                value.validate(dotted + ".")
                continue
            rule = f.metadata.get(_RULE)
            if rule is not None and not rule.holds(value):
                raise ConfigError(dotted, rule.refusal(value))
        for name, message in self.problems():
            raise ConfigError(prefix + name, message)

    def problems(self) -> Iterator[tuple[str, str]]:
        """(key relative to this section, message) of each rule that spans several keys."""
        return iter(())
