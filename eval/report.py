"""``python -m eval report DIR``: markdown plus PNG plots from whatever ``*.json`` results are in DIR.

Owns the plots: latency CDFs (from ``latency_samples``), throughput and server memory over time
(from ``timeline``), learning curves (from any nested ``{"series": [[x, y], ...]}``, one line per
arm), and ``DIR/report.md``: the headlines beside their targets, the ideal and the paper's anchors
(report_anchors.py), the machines the runs used, then each experiment's tables, run metadata and
images (``DIR/plots/*.png``).
The conventions are documented in ``eval/experiments/__init__.py``. Uses matplotlib's Agg
backend (no display). Must not import the server runtime or sglang.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from eval.report_anchors import headline_rows, machine_lines  # noqa: E402
from eval.table import render_markdown  # noqa: E402

CDF_METRICS = (("ttft_s", "TTFT"), ("tpot_s", "TPOT"), ("itl_s", "inter-token latency"), ("e2e_s", "end-to-end"))


def _cdf(ax: Any, values: list[float], label: str) -> None:
    xs = sorted(v * 1000.0 for v in values)
    ys = [(i + 1) / len(xs) for i in range(len(xs))]
    ax.step(xs, ys, where="post", label=f"{label} (n={len(xs)})")


def _save(fig: Any, path: Path) -> Path:
    """Lays out, writes (110 dpi) and closes ``fig``; returns ``path``."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_latency_cdfs(name: str, samples: dict[str, dict[str, list[float]]], out: Path) -> Path | None:
    metrics = [(k, t) for k, t in CDF_METRICS if any(s.get(k) for s in samples.values())]
    if not metrics:
        return None
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6), squeeze=False)
    for ax, (key, title) in zip(axes[0], metrics):
        for label, s in samples.items():
            if s.get(key):
                _cdf(ax, s[key], label)
        ax.set_title(f"{title} CDF")
        values = [v for s in samples.values() for v in (s.get(key) or []) if v > 0]
        wide = bool(values) and max(values) / min(values) > 100  # heavy tail: log scale keeps the body visible
        if wide:
            ax.set_xscale("log")
        ax.set_xlabel("ms (log scale)" if wide else "ms")
        ax.set_ylabel("fraction of requests")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{name}: latency")
    return _save(fig, out / f"{name}-latency-cdf.png")


def plot_timeline(name: str, timeline: dict[str, list[dict[str, float]]], out: Path) -> Path | None:
    panels = [("output_tps", "output tokens/s"), ("request_rps", "completed requests/s"),
              ("rss_bytes", "server RSS (MiB)"), ("store_bytes", "activation store (MiB)"),
              ("train_steps", "train steps"), ("load1", "load average (1 min)")]
    panels = [(k, t) for k, t in panels if any(k in row for rows in timeline.values() for row in rows)]
    if not panels:
        return None
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.4 * len(panels)), squeeze=False, sharex=True)
    for ax, (key, title) in zip(axes[:, 0], panels):
        for label, rows in timeline.items():
            pts = [(r["t_s"], r[key] / 2**20 if key.endswith("_bytes") else r[key]) for r in rows if key in r]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=label)
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[-1, 0].set_xlabel("seconds since session start")
    fig.suptitle(f"{name}: throughput and memory over time")
    return _save(fig, out / f"{name}-timeline.png")


def find_series(obj: Any, path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """(dotted path, dict) for every nested dict with a ``series`` list of [x, y] pairs."""
    if isinstance(obj, dict):
        if isinstance(obj.get("series"), list) and all(isinstance(p, (list, tuple)) and len(p) == 2
                                                       for p in obj["series"]):
            yield path or "series", obj
        for k, v in obj.items():
            if k not in ("series", "meta"):
                yield from find_series(v, f"{path}.{k}" if path else str(k))


def plot_learning(name: str, result: dict[str, Any], out: Path) -> Path | None:
    found = [(p, d) for p, d in find_series(result) if d["series"]]
    if not found:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, d in found:
        ax.plot([p[0] for p in d["series"]], [p[1] for p in d["series"]], marker=".", label=label)
    ax.set_xlabel(found[0][1].get("x_label", "samples"))
    ax.set_ylabel(found[0][1].get("y_label", result.get("metric", "value")))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"{name}: learning curve")
    return _save(fig, out / f"{name}-learning.png")


def _meta_lines(meta: dict[str, Any]) -> list[str]:
    env = meta.get("environment", {})
    pk = env.get("packages", {})
    start, end = meta.get("load_start", {}), meta.get("load_end", {})
    return [
        f"- started {meta.get('started_at')}, wall {meta.get('wall_s', 0):.1f} s, quick={meta.get('quick')}, "
        f"seed={meta.get('seed')}",
        *(["- **machine was busy (load average above the CPU count): timings are suspect**"]
          if meta.get("is_machine_busy") else []),
        f"- CPU: harness {meta.get('harness_cpu_s', 0):.1f} s, servers {meta.get('server_cpu_s', 0):.1f} s; "
        f"load average start {start.get('loadavg')}, end {end.get('loadavg')}; {env.get('cpu_count')} CPUs",
        f"- config `{meta.get('config_path')}`, url {meta.get('url')}, dataset {meta.get('dataset_path') or 'default'}",
        f"- versions: " + ", ".join(f"{k} {v}" for k, v in pk.items()) + f"; git {env.get('git_commit')}",
    ]


def write_report(directory: Path) -> Path:
    """Writes ``directory/report.md`` and ``directory/plots/*.png``; returns the markdown path."""
    files = sorted(p for p in directory.glob("*.json"))
    if not files:
        raise FileNotFoundError(f"no *.json results in {directory}")
    plots = directory / "plots"
    plots.mkdir(exist_ok=True)
    loaded = {f.stem: r for f in files if isinstance(r := json.loads(f.read_text()), dict)}
    md = [f"# Eval report: {directory}", ""]
    summary = headline_rows(loaded)
    if summary:
        md += ["## Headlines", "", "Each result beside its target, the ideal the same run measured "
               "and the paper's anchor it answers.", "", *summary, ""]
    machines = machine_lines([r["meta"] for r in loaded.values() if isinstance(r.get("meta"), dict)])
    if machines:
        md += ["## Machine", "", *machines, ""]
    for name, result in loaded.items():
        md += [f"## {name}", ""]
        if result.get("error"):
            md += ["**FAILED**", "", "```", str(result["error"])[-3000:], "```", ""]
        if isinstance(result.get("meta"), dict):
            md += _meta_lines(result["meta"]) + [""]
        body = {k: v for k, v in result.items() if k not in ("meta", "error")}
        table = render_markdown(body)
        if table:
            md += [table, ""]
        images = [
            plot_latency_cdfs(name, result["latency_samples"], plots) if isinstance(result.get("latency_samples"), dict) else None,
            plot_timeline(name, result["timeline"], plots) if isinstance(result.get("timeline"), dict) else None,
            plot_learning(name, body, plots),
        ]
        md += [f"![{p.stem}](plots/{p.name})" for p in images if p is not None] + [""]
    path = directory / "report.md"
    path.write_text("\n".join(md))
    return path
