"""Experiment registry: every module in this package is one experiment, found with pkgutil.

Adding an experiment = adding ONE module ``eval/experiments/<name>.py`` exposing::

    NAME: str                    # what `python -m eval run NAME` calls it (e.g. "record-overhead")
    def run(ctx) -> dict: ...    # returns the JSON fields of docs/results.md for that experiment

Modules whose name starts with ``_`` are helpers, not experiments. Nothing else is registered.

The ``ctx`` contract (``eval.context.RunContext``)
---------------------------------------------------
Attributes (read-only by convention):
  ``name``          the experiment name being run
  ``config_path``   Path: ``--config`` (default ``configs/cpu-smollm2.yaml``)
  ``dataset_path``  Path | None: ``--dataset-path`` (None: packaged default conversations)
  ``url``           str | None: ``--url`` (a server to use instead of starting one)
  ``out_dir``       Path: where ``NAME.json`` goes; write extra files (logs, traces) under it
  ``quick``         bool: ``--quick``; must finish in a few minutes on 2 CPU cores
  ``seed``          int: seed every RNG from it (default 0)
  ``progress``      bool: show tqdm progress bars
  ``workload_name`` str: ``--workload`` (``chitchat``, the default, or ``prompt-heavy``)
  ``feedback_delay_s`` float: ``--feedback-delay``, the mean delay of simulated users' feedback
      (0: at once), for experiments that rate completions (``online``)
Methods:
  ``with ctx.server(config_path=None, overrides=()) as base_url:`` yields ``http://127.0.0.1:PORT``
      (no ``/v1``). Without ``--url`` it starts ``alchemist-sgl serve --config FILE --port N --set a.b=c``
      on a free port, waits for ``/health``, stops it and its children on exit, and records the
      resolved config, port, readiness time, server CPU seconds and state folder in
      ``meta.servers``. The server keeps its state (checkpoints, adapters, versions, feedback and
      completion database) in ``out_dir/state/server-K/``, never in the ``var/`` folder that
      ``make run`` resumes; overrides may name other state paths only under ``out_dir``. With
      ``--url`` it yields that URL (config/overrides are recorded as ignored): an experiment that
      needs two differently configured servers should say so in its result when ``ctx.url`` is set.
  ``ctx.workload(min_turns=2)`` -> list[Conversation]: ``--dataset-path`` or the packaged default;
      with ``--workload prompt-heavy``, single-turn long prompts built from them.
  ``ctx.load(base_url, workload, spec, feedback=None, poll_status=False)`` -> ``LoadResult``: one
      monitored load-generator session (``eval.loadgen.runner.LoadSpec``); afterwards
      ``ctx.last_timeline`` holds throughput, load average and (for servers ctx started) server
      memory over time; ``poll_status=True`` adds ``store_bytes``/``train_steps``/
      ``train_samples_pending`` from ``/alchemist/status`` each second.
Helpers to build on: ``eval.loadgen.ab.run_ab`` (A/B with alternated blocks and cache flushes;
pass ``run_block=ctx.load``), ``eval.server.flush_cache``, ``eval.loadgen.workloads``
(ShareGPT/chitchat/MT-Bench/shared-system-prompt), ``eval.loadgen.feedback.FeedbackPolicy``.

What the harness does around ``run``: writes ``out_dir/NAME.json`` = the returned dict plus a
``meta`` key (reserved: experiment, quick, argv, started/finished, wall_s, CPU seconds, load
averages, package versions, git commit, resolved config, servers used); prints a table of the
scalar fields. If ``run`` raises, the JSON holds ``meta`` and ``error`` and the command fails.

Conventions the report (``python -m eval report DIR``) understands, all optional:
  ``latency_samples``: ``{label: {"ttft_s": [...], "tpot_s": [...], "e2e_s": [...], "itl_s": [...]}}``
      -> latency CDF plots (seconds; one line per label).
  ``timeline``: ``{label: [{"t_s": .., "request_rps": .., "output_tps": .., "rss_bytes": ..,
      "store_bytes": .., "train_steps": .., "load1": ..}]}`` (each row any subset)
      -> throughput and memory over time (``ctx.last_timeline`` has exactly this row shape).
  any nested ``{"series": [[x, y], ...]}`` (e.g. the ``learning`` experiment's per-mode entries)
      -> a learning-curve plot; add ``"x_label"``/``"y_label"`` keys beside ``series`` to name axes.
Other keys are shown as tables: scalars as ``key | value``; a dict of dicts of scalars (e.g.
``{"rate=0.5": {...}, "rate=2": {...}}``) as one row per inner dict.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType


def discover() -> dict[str, ModuleType]:
    """``{NAME: module}`` for every experiment module in this package."""
    found: dict[str, ModuleType] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        name = getattr(module, "NAME", None)
        if not isinstance(name, str) or not callable(getattr(module, "run", None)):
            raise TypeError(f"eval/experiments/{info.name}.py must define NAME: str and run(ctx) -> dict")
        if name in found:
            raise ValueError(f"experiment name {name!r} defined twice ({found[name].__name__}, {module.__name__})")
        found[name] = module
    return found
