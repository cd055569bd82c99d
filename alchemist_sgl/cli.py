"""`alchemist-sgl serve|prepare|check`: the command line.

Owns argument parsing and turning typed errors into one-line messages with exit code 2.
Imports sglang only inside commands that need it, after the environment is prepared.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

from alchemist_sgl.config import Config, load_config
from alchemist_sgl.errors import AlchemistError
from alchemist_sgl.prepare import MODEL_NAMES, default_cache_dir, prepare, resolve_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="alchemist-sgl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve_p = sub.add_parser("serve", help="serve a model with SGLang, our plugin active")
    serve_p.add_argument("--config", required=True, help="YAML config file (configs/*.yaml)")
    serve_p.add_argument("--port", type=int, default=None, help="overrides server.port")
    serve_p.add_argument("--set", action="append", default=[], metavar="a.b=c", help="override a config key")

    prep_p = sub.add_parser("prepare", help="build offline model folders")
    prep_p.add_argument("--model", choices=MODEL_NAMES, action="append",
                        help="model to build (default: all)")
    prep_p.add_argument("--cache-dir", default=None, help="where model folders live (default var/models)")

    check_p = sub.add_parser("check", help="check the config, the hook-point manifest and the environment")
    check_p.add_argument("--config", required=True)
    check_p.add_argument("--set", action="append", default=[], metavar="a.b=c")

    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "prepare":
            cache = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
            for name in args.model or MODEL_NAMES:
                print(prepare(name, cache))
            return 0
        if args.command == "check":
            return _check(args)
    except AlchemistError as exc:
        print(f"alchemist-sgl: error: {exc}", file=sys.stderr)
        return 2
    return 1


def _prepared(args: argparse.Namespace) -> tuple[Config, Path]:
    """Loads the config, builds the model folder if missing, sets the process environment."""
    from alchemist_sgl.integration.environment import prepare_environment  # noqa: PLC0415

    config = load_config(args.config, args.set)
    model_path = resolve_model(config.server.model, _cache_dir(config))
    prepare_environment(config, model_path)
    return config, model_path


def _serve(args: argparse.Namespace) -> int:
    config, model_path = _prepared(args)
    from alchemist_sgl.integration.launch import serve  # noqa: PLC0415  (imports sglang)

    try:
        serve(config, model_path, args.port, on_ready=_print_ready(config))
    except KeyboardInterrupt:  # Ctrl-C: the server has stopped (integration/shutdown.py)
        return 130
    return 0


def _check(args: argparse.Namespace) -> int:
    config, model_path = _prepared(args)
    from alchemist_sgl.integration.environment import check_environment_switches, is_cpu_run  # noqa: PLC0415
    from alchemist_sgl.integration.launch import sglang_argv  # noqa: PLC0415
    from alchemist_sgl.integration.manifest import check_manifest  # noqa: PLC0415

    check_environment_switches(config)
    names = check_manifest(is_cpu=is_cpu_run(config))
    argv = sglang_argv(config, model_path)
    print(f"ok: config {args.config}, model {model_path}, {len(names)} SGLang names resolved")
    print("sglang serve " + " ".join(argv))
    return 0


def _cache_dir(config: Config) -> Path:
    """``server.cache_dir``; a relative one is under the repository."""
    path = Path(config.server.cache_dir)
    if not path.is_absolute():
        path = Path(__file__).resolve().parent.parent / path
    return path


def _print_ready(config: Config) -> Callable[[str], None]:
    name = config.server.served_model_name

    def on_ready(base_url: str) -> None:
        print(
            f"\nalchemist-sgl is serving '{name}' at {base_url}\n"
            f"  curl {base_url}/v1/chat/completions -H 'Content-Type: application/json' \\\n"
            f"    -d '{{\"model\": \"{name}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello!\"}}]}}'\n"
            f"  curl {base_url}/alchemist/status\n",
            flush=True)

    return on_ready


if __name__ == "__main__":
    sys.exit(main())
