"""Launching SGLang's own HTTP server with our routes and plugin.

Owns turning the ``sglang:`` config section into SGLang's ``ServerArgs`` (verbatim: each key is a
``sglang serve`` flag, spelled with ``-`` or ``_``), adding the ``/alchemist/*`` routes to SGLang's
FastAPI ``app`` before launch, and calling ``launch_server``. The caller must have run
``environment.prepare_environment`` before this module is imported (it imports sglang).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
from pathlib import Path
from typing import Any, Callable

from alchemist_sgl.api.app import build_router
from alchemist_sgl.api.feedback_routes import build_feedback_router
from alchemist_sgl.api.metrics_route import build_metrics_router
from alchemist_sgl.api.guards import guard_request_fields, pin_model_names, refuse_weight_routes
from alchemist_sgl.feedback.completion_log import SqliteCompletionLog
from alchemist_sgl.feedback.ratings import FeedbackStore
from alchemist_sgl.online.versions import ServingVersionReader
from alchemist_sgl.config import Config
from alchemist_sgl.api.control import CommandResult, ControlQueue
from alchemist_sgl.errors import ConfigError
from alchemist_sgl.integration.environment import CONTROL_DB_ENV, check_environment_switches, is_cpu_run
from alchemist_sgl.integration.manifest import check_manifest
from alchemist_sgl.integration.plugin import STATUS_KEY
from alchemist_sgl.integration.shutdown import stop_children, with_engine_shutdown
from alchemist_sgl.log import get_logger

logger = get_logger(__name__)

# Keys of the sglang section that alchemist-sgl sets itself from the server section.
_OWNED_KEYS = {"model_path", "served_model_name", "host", "port"}


def sglang_argv(config: Config, model_path: Path, port: int | None = None) -> list[str]:
    """The ``sglang serve`` argument list for this config; raises ConfigError for unknown keys."""
    from sglang.srt.server_args import ServerArgs  # noqa: PLC0415

    parser = argparse.ArgumentParser(prog="sglang serve", add_help=False)
    ServerArgs.add_cli_args(parser)
    actions = {opt: action for action in parser._actions for opt in action.option_strings}
    argv: list[str] = []
    for key, value in config.sglang.items():
        dest = str(key).replace("-", "_")
        flag = "--" + str(key).replace("_", "-")
        if dest in _OWNED_KEYS:
            raise ConfigError(f"sglang.{key}", f"set it in the server section instead (server.{_owner(dest)})")
        action = actions.get(flag)
        if action is None:
            raise ConfigError(f"sglang.{key}", "not an argument of `sglang serve` in sglang 0.5.23")
        argv += _render(flag, value, action, f"sglang.{key}")
    argv += ["--model-path", str(model_path),
             "--served-model-name", config.server.served_model_name,
             "--host", config.server.host,
             "--port", str(port if port is not None else config.server.port)]
    return argv


def build_server_args(config: Config, model_path: Path, port: int | None = None) -> Any:
    from sglang.srt.server_args import prepare_server_args  # noqa: PLC0415

    argv = sglang_argv(config, model_path, port)
    try:
        return prepare_server_args(argv)
    except SystemExit as exc:  # argparse reports bad values by exiting
        raise ConfigError("sglang", f"SGLang rejected the arguments {argv}: exit {exc.code}") from exc


def serve(config: Config, model_path: Path, port: int | None = None,
          on_ready: Callable[[str], None] | None = None) -> None:
    """Checks the manifest, launches SGLang's HTTP server with our routes; blocks until it exits."""
    check_environment_switches(config)
    checked = check_manifest(is_cpu=is_cpu_run(config))
    logger.info("hook-point manifest: %d SGLang names resolved", len(checked))
    server_args = build_server_args(config, model_path, port)

    from sglang.srt.entrypoints import http_server  # noqa: PLC0415
    from sglang.srt.plugins import load_plugins  # noqa: PLC0415

    load_plugins()
    queue = ControlQueue(os.environ[CONTROL_DB_ENV])
    app = http_server.app
    from sglang.srt.utils.auth import AuthLevel, auth_level  # noqa: PLC0415

    app.include_router(build_router(_fetch_status, functools.partial(_run_command, queue),
                                    admin_api_key=getattr(server_args, "admin_api_key", None),
                                    mark_admin_endpoint=auth_level(AuthLevel.ADMIN_OPTIONAL)))
    fc = config.feedback
    feedback_store = FeedbackStore(fc.db_path)
    answers: dict[int, int] = {}
    app.include_router(build_metrics_router(_fetch_status, feedback_store.counts_by_label, answers))
    app.include_router(build_feedback_router(
        feedback_store, SqliteCompletionLog(fc.db_path, ttl_s=fc.completion_ttl_s), answer_counts=answers,
        api_key=getattr(server_args, "api_key", None), max_body_bytes=fc.max_body_bytes,
        max_pending=fc.max_pending, rate_limit_per_minute=fc.rate_limit_per_minute,
        detokenize=_detokenize, admin_api_key=getattr(server_args, "admin_api_key", None),
        mark_feedback_endpoint=auth_level(AuthLevel.NORMAL),
        mark_admin_endpoint=auth_level(AuthLevel.ADMIN_OPTIONAL)))
    versions = ServingVersionReader(Path(config.train.checkpoint_dir) / "versions.json")
    refuse_weight_routes(app)
    guard_request_fields(app)
    pin_model_names(app, config.server.served_model_name, functools.partial(_serving_version, versions))
    base_url = f"http://{config.server.host}:{port if port is not None else config.server.port}"
    callback = (lambda: on_ready(base_url)) if on_ready is not None else None
    app.router.lifespan_context = with_engine_shutdown(app.router.lifespan_context)  # Note [Ctrl-C]
    try:
        http_server.launch_server(server_args, launch_callback=callback)
    finally:
        stop_children()  # Note [Ctrl-C] (shutdown.py): nothing is left for the exit to wait on


def _detokenize(ids: list[int]) -> str:
    """Token ids to text with the served model's tokenizer (HTTP process; KTO export)."""
    from sglang.srt.entrypoints import http_server  # noqa: PLC0415

    return http_server._global_state.tokenizer_manager.tokenizer.decode(ids, skip_special_tokens=True)


def _serving_version(versions: ServingVersionReader) -> str:
    """The serving version, read from the scheduler's versions file (a stat per call); also keeps
    SGLang's tokenizer-side ``weight_version`` equal to it (the scheduler side is set at publish)."""
    from sglang.srt.entrypoints import http_server  # noqa: PLC0415

    current = versions.current()
    manager = getattr(http_server._global_state, "tokenizer_manager", None)
    if manager is not None and manager.config_value("weight_version") != current:
        manager.record_config_updates("tokenizer.weight_version", weight_version=current)
    return current


async def _fetch_status() -> dict[str, Any] | None:
    """Our status dict from the scheduler process, over SGLang's get_internal_state path."""
    from sglang.srt.entrypoints import http_server  # noqa: PLC0415

    states = await http_server._global_state.tokenizer_manager.get_internal_state()
    if states and isinstance(states[0].get(STATUS_KEY), dict):
        version = states[0][STATUS_KEY].get("weight_version")
        manager = http_server._global_state.tokenizer_manager
        if version and manager.config_value("weight_version") != version:
            manager.record_config_updates("tokenizer.weight_version", weight_version=version)
    if not states:
        return None
    return states[0].get(STATUS_KEY)


async def _run_command(queue: ControlQueue, kind: str, payload: dict[str, Any]) -> CommandResult:
    """Writes the command to the shared table, rings the scheduler through get_internal_state
    (whose hook runs pending commands), and reads the result (Note [control doorbell])."""
    command_id = await asyncio.to_thread(queue.submit, kind, payload)
    await _fetch_status()
    return await asyncio.to_thread(queue.result, command_id)


def _render(flag: str, value: Any, action: argparse.Action, dotted: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, bool):
        takes_value = action.nargs != 0
        if not takes_value:
            return [flag] if value else []
        return [flag, "true" if value else "false"]
    if isinstance(value, (list, tuple)):
        return [flag, *[str(v) for v in value]] if value else []
    if isinstance(value, dict):
        return [flag, json.dumps(value)]
    if action.nargs == 0:
        raise ConfigError(dotted, f"is a switch: write true or false, not {value!r}")
    return [flag, str(value)]


def _owner(dest: str) -> str:
    return {"model_path": "model", "served_model_name": "served_model_name"}.get(dest, dest)
