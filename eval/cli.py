"""Command line of the harness: ``python -m eval run|report|list|convert``.

Owns argument parsing, the default output folder (``eval/results/<UTC timestamp>``), running one
experiment inside a ``RunContext`` and writing ``DIR/NAME.json`` (the experiment's dict plus
``meta``), and printing its table. Must not import the server runtime or sglang.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

DEFAULT_CONFIG = Path("configs/cpu-smollm2.yaml")
WORKLOADS = ("chitchat", "prompt-heavy")


def _non_negative(text: str) -> float:
    value = float(text)
    if not value >= 0.0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, tuple)):
        return list(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def _clean(obj: Any) -> Any:
    """NaN/inf -> None so the file is strict JSON."""
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def write_result(path: Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_clean(result), indent=1, default=_json_default, allow_nan=False) + "\n")
    os.replace(tmp, path)


def run_experiment(args: argparse.Namespace) -> int:
    from eval.context import RunContext, resolve_config
    from eval.experiments import discover
    from eval.monitor import environment, machine_load
    from eval.table import render_text

    experiments = discover()
    if args.name not in experiments:
        print(f"unknown experiment {args.name!r}; known: {', '.join(sorted(experiments))}", file=sys.stderr)
        return 2
    out_dir = Path(args.out) if args.out else Path("eval/results") / datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    config_path = Path(args.config)
    if args.url is None and not config_path.exists():
        print(f"config file {config_path} does not exist (--config)", file=sys.stderr)
        return 2
    ctx = RunContext(name=args.name, config_path=config_path,
                     dataset_path=Path(args.dataset_path) if args.dataset_path else None,
                     url=args.url.rstrip("/") if args.url else None, out_dir=out_dir, quick=args.quick,
                     seed=args.seed, progress=not args.no_progress, workload_name=args.workload,
                     feedback_delay_s=args.feedback_delay, rate_rps=args.rate, round_s=args.round_s,
                     smoke=args.smoke)
    meta: dict[str, Any] = {
        "experiment": args.name, "quick": args.quick, "smoke": args.smoke, "argv": sys.argv, "seed": args.seed,
        "workload": args.workload, "feedback_delay_s": args.feedback_delay, "rate_rps": args.rate,
        "round_s": args.round_s,
        "config_path": str(config_path), "dataset_path": args.dataset_path, "url": ctx.url,
        "config": resolve_config(config_path) if config_path.exists() else None,
        "environment": environment(),
        "started_at": datetime.now(timezone.utc).isoformat(), "load_start": machine_load(),
    }
    t0, cpu0 = time.perf_counter(), time.process_time()
    result: dict[str, Any]
    failed = False
    try:
        result = dict(experiments[args.name].run(ctx))
    except KeyboardInterrupt:
        raise
    except Exception:  # noqa: BLE001 - recorded in the JSON, then the command fails
        result = {"error": traceback.format_exc()}
        failed = True
    if "meta" in result:
        raise ValueError(f"experiment {args.name} returned the reserved key 'meta'")
    meta.update(finished_at=datetime.now(timezone.utc).isoformat(), wall_s=time.perf_counter() - t0,
                harness_cpu_s=time.process_time() - cpu0, load_end=machine_load(), servers=ctx.servers)
    meta["server_cpu_s"] = sum(s.get("cpu_s") or 0.0 for s in ctx.servers)
    cpus = os.cpu_count() or 1
    busiest = max(meta["load_start"]["loadavg"][0], meta["load_end"]["loadavg"][0])
    meta["is_machine_busy"] = busiest > cpus  # other processes competed for the CPUs: timings are suspect
    result["meta"] = meta
    path = out_dir / f"{args.name}.json"
    write_result(path, result)
    print(render_text({k: v for k, v in result.items() if k != "error"}))
    print(f"\nwall {meta['wall_s']:.1f} s, harness CPU {meta['harness_cpu_s']:.1f} s, "
          f"server CPU {meta['server_cpu_s']:.1f} s, load average {meta['load_end']['loadavg'][0]:.2f}")
    if meta["is_machine_busy"]:
        print(f"WARNING: load average reached {busiest:.1f} on {cpus} CPUs during this run: other processes "
              "competed for the CPUs, so latency/throughput numbers are not comparable with a quiet run")
    print(f"wrote {path}")
    if failed:
        print(result["error"], file=sys.stderr)
        return 1
    return 0


def convert(args: argparse.Namespace) -> int:
    from eval.loadgen import workloads as wl

    sources = {"chitchat": wl.chitchat_path, "mtbench-questions": wl.mtbench_question_path,
               "mtbench-sharegpt": wl.mtbench_sharegpt_path}
    path = sources[args.source]() if args.source in sources else Path(args.source)
    convs = wl.load_workload(path)
    Path(args.output).write_text(json.dumps(wl.to_sharegpt(convs), ensure_ascii=False) + "\n")
    print(f"wrote {len(convs)} conversations from {path} to {args.output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m eval", description="alchemist-sgl eval harness")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one experiment, write DIR/NAME.json and print a table")
    run.add_argument("name")
    run.add_argument("--config", default=str(DEFAULT_CONFIG), help="server config (default %(default)s)")
    run.add_argument("--dataset-path", default=None, help="ShareGPT / chitchat / MT-Bench file")
    run.add_argument("--url", default=None, help="use this running server instead of starting one")
    run.add_argument("--out", default=None, help="output folder (default eval/results/<timestamp>)")
    run.add_argument("--quick", action="store_true", help="a few minutes on 2 CPU cores")
    run.add_argument("--smoke", action="store_true",
                     help="online, spike, serving: the shortest run that goes through every step (one round of "
                          "blocks of seconds; tests use it with the tiny model: numbers mean nothing)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--workload", choices=WORKLOADS, default=WORKLOADS[0],
                     help="chitchat: multi-turn conversations (default); prompt-heavy: single-turn prompts of "
                          "~400-600 tokens built from them, short answers")
    run.add_argument("--feedback-delay", type=_non_negative, default=0.0, metavar="MEAN",
                     help="experiments that rate completions: exponential delay per completion with this mean "
                          "in seconds (default 0: at once)")
    run.add_argument("--rate", type=_non_negative, default=None, metavar="RPS",
                     help="online, cadence: the request rate instead of the workload's default (size the "
                          "load to the machine: a CPU without bf16/AMX units prefills ~10x slower)")
    run.add_argument("--round-s", type=_non_negative, default=None, metavar="S",
                     help="online: train.round_s of its server (default: quick 12, full 30); its blocks "
                          "last at least 2.5 round lengths")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    rep = sub.add_parser("report", help="markdown + PNG plots from the JSON files in DIR")
    rep.add_argument("dir")
    sub.add_parser("list", help="list the experiments")
    conv = sub.add_parser("convert", help="write a workload as a ShareGPT file (for sglang.benchmark.serving)")
    conv.add_argument("source", help="chitchat | mtbench-questions | mtbench-sharegpt | a file")
    conv.add_argument("output")
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = build_parser().parse_args(argv)
    if args.command == "run":
        return run_experiment(args)
    if args.command == "report":
        from eval.report import write_report

        path = write_report(Path(args.dir))
        print(f"wrote {path}")
        return 0
    if args.command == "list":
        from eval.experiments import discover

        for name, module in sorted(discover().items()):
            doc = (module.__doc__ or "").strip().splitlines()
            print(f"{name:20s} {doc[0] if doc else ''}")
        return 0
    return convert(args)
