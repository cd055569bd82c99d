"""Turning an experiment's result dict into tables (plain text for the terminal, markdown for
the report). Pure. Plot-only keys (``latency_samples``, ``timeline``, ``series``) and ``meta``
are skipped; a dict of dicts of scalars becomes one table with a row per inner dict; every
other scalar, at any depth, becomes a ``key | value`` row with a dotted key.
"""

from __future__ import annotations

import math
from typing import Any

PLOT_KEYS = frozenset({"latency_samples", "timeline", "series", "meta"})
Table = tuple[str, list[str], list[list[str]]]  # (title, headers, rows)


def fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        if value != 0 and (abs(value) >= 1e6 or abs(value) < 1e-3):
            return f"{value:.3e}"
        return f"{value:.4g}"
    return str(value)


def _is_scalar(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, float, str))


def _is_matrix(v: Any) -> bool:
    return (isinstance(v, dict) and len(v) > 0
            and all(isinstance(row, dict) and row and sum(_is_scalar(x) for x in row.values()) >= 2
                    for row in v.values()))


def _flatten(prefix: str, v: Any, out: list[list[str]], matrices: list[Table]) -> None:
    if _is_scalar(v):
        out.append([prefix, fmt(v)])
    elif isinstance(v, dict):
        if _is_matrix(v):
            keys: list[str] = []
            for row in v.values():
                keys += [k for k, x in row.items() if _is_scalar(x) and k not in keys]
            if len(keys) > len(v):  # long rows read better as columns: one row per metric
                rows = [[k] + [fmt(row.get(k, "")) for row in v.values()] for k in keys]
                matrices.append((prefix, ["metric"] + [str(name) for name in v], rows))
            else:
                rows = [[str(name)] + [fmt(row.get(k, "")) for k in keys] for name, row in v.items()]
                matrices.append((prefix, [prefix.rsplit(".", 1)[-1]] + keys, rows))
            for name, row in v.items():  # nested non-scalars inside the rows
                for k, x in row.items():
                    if not _is_scalar(x) and k not in PLOT_KEYS:
                        _flatten(f"{prefix}.{name}.{k}", x, out, matrices)
            return
        for k, x in v.items():
            if k not in PLOT_KEYS:
                _flatten(f"{prefix}.{k}" if prefix else str(k), x, out, matrices)
    elif isinstance(v, (list, tuple)) and len(v) <= 8 and all(_is_scalar(x) for x in v):
        out.append([prefix, "[" + ", ".join(fmt(x) for x in v) + "]"])
    # longer lists are data, not table material


def tables(result: dict[str, Any]) -> list[Table]:
    scalars: list[list[str]] = []
    matrices: list[Table] = []
    _flatten("", result, scalars, matrices)
    out: list[Table] = [("results", ["field", "value"], scalars)] if scalars else []
    return out + matrices


def render_text(result: dict[str, Any]) -> str:
    blocks = []
    for title, headers, rows in tables(result):
        widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows)]
        line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
        blocks.append("\n".join([f"== {title}", line(headers), line(["-" * w for w in widths])]
                                + [line(r) for r in rows]))
    return "\n\n".join(blocks)


def render_markdown(result: dict[str, Any]) -> str:
    blocks = []
    for title, headers, rows in tables(result):
        md = [f"**{title}**", "", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        md += ["| " + " | ".join(r) + " |" for r in rows]
        blocks.append("\n".join(md))
    return "\n\n".join(blocks)
