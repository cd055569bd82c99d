"""alchemist-sgl eval harness: load generator, workloads, simulated users, experiments, report.

Talks to the server over HTTP only: nothing under ``eval/`` imports the server runtime
(``alchemist_sgl`` other than the pure ``alchemist_sgl.config``) or sglang. Layout:
``cli.py`` (``python -m eval``), ``context.py`` (the ``ctx`` given to experiments),
``server.py`` (start/stop servers, flush the radix cache), ``monitor.py`` (memory/load sampling,
environment), ``table.py`` and ``report.py`` (output), ``loadgen/`` (workloads, arrivals, the
streaming load generator, stats, simulated-user feedback, A/B helper), ``experiments/`` (one
module per experiment; contract in its ``__init__``). See ``eval/README.md``.
"""
