"""HTTP routes of alchemist-sgl (run in SGLang's HTTP process).

Owns the ``/alchemist/*`` routes: status, the admin routes (docs/api.md) and the
generic command route. Data owned by the scheduler process is reached through injected async
callables (built in ``integration/`` over SGLang's existing control channel and the SQLite command
table of ``control.py``), so this module imports no sglang and is testable with fakes. Input
schemas live in ``schemas.py``; middlewares for SGLang's own routes in ``guards.py``; the key check
and the answer to a refusal in ``http.guard`` (Note [route guard]).

Note [admin auth]: with ``admin_api_key`` set, every admin route and the command route require
``Authorization: Bearer <key>`` (401 otherwise). SGLang's own key middleware, when present, runs
first and treats unmarked routes as NORMAL (it demands ``--api-key`` for them), so with both keys set
no single header could pass both checks; ``mark_admin_endpoint`` (SGLang's
``auth_level(AuthLevel.ADMIN_OPTIONAL)``, injected by ``integration/``) makes SGLang's middleware ask
for the admin key on these routes too.

Note [command errors]: a failed command answers with the error dict's int ``http_status`` when it
has one (404 unknown version, 409, 422 naming a ``field``, 429 queue full), else 404 for an unknown
command kind and 422 for any other failure; a command the scheduler never answered is a 504.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from alchemist_sgl.api.control import CommandResult
from alchemist_sgl.api.http import BearerKey, EndpointMarker, RouteGuard, guard, parse_json, read_body
from alchemist_sgl.api.schemas import FieldError, bounded_int, check_keys, normalize_samples, version_name

FetchSchedulerState = Callable[[], Awaitable[dict[str, Any] | None]]  # the status dict (JSON)
RunCommand = Callable[[str, dict[str, Any]], Awaitable[CommandResult]]  # kind, JSON payload

DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB, as feedback.max_body_bytes' default
VERSIONS_DEFAULT_LIMIT = 50
VERSIONS_MAX_LIMIT = 500


def build_router(fetch_status: FetchSchedulerState, run_command: RunCommand, *,
                 admin_api_key: str | None = None,
                 mark_admin_endpoint: EndpointMarker | None = None,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> APIRouter:
    """Routes: ``GET /alchemist/status`` (open), and behind the admin key (Note [admin auth])
    ``GET /alchemist/versions``, ``POST /alchemist/rollback``, ``POST /alchemist/train/pause``,
    ``POST /alchemist/train/resume``, ``POST /alchemist/train/replay``,
    ``POST /alchemist/train/samples`` and ``POST /alchemist/commands/{kind}``. Bodies over
    ``max_body_bytes`` answer 413."""
    router = APIRouter()
    admin = guard(BearerKey(admin_api_key, "admin key", "--admin-api-key"), mark=mark_admin_endpoint)
    _add_status_route(router, fetch_status)
    _add_version_routes(router, admin, run_command, max_body_bytes)
    _add_train_routes(router, admin, run_command, max_body_bytes)
    _add_command_route(router, admin, run_command, max_body_bytes)
    return router


def _add_status_route(router: APIRouter, fetch_status: FetchSchedulerState) -> None:
    @router.get("/alchemist/status")
    async def alchemist_status() -> JSONResponse:
        status = await fetch_status()
        if status is None:
            return JSONResponse(
                status_code=503,
                content={"error": "the alchemist plugin is not active in the scheduler process; "
                                  "see the server log for the reason"})
        return JSONResponse(content=status)


def _add_version_routes(router: APIRouter, admin: RouteGuard, run_command: RunCommand,
                        max_body_bytes: int) -> None:
    @router.get("/alchemist/versions")
    @admin
    async def alchemist_versions(request: Request) -> JSONResponse:
        query = request.query_params
        limit = bounded_int(query.get("limit"), "limit", VERSIONS_DEFAULT_LIMIT, 1, VERSIONS_MAX_LIMIT)
        payload = {"limit": limit, "offset": bounded_int(query.get("offset"), "offset", 0, 0)}
        return command_response(await run_command("versions.list", payload))

    @router.post("/alchemist/rollback")
    @admin
    async def alchemist_rollback(request: Request) -> JSONResponse:
        body = await _json_object(request, max_body_bytes)
        check_keys(body, ("to",), "")
        payload = {"to": version_name(body.get("to"), "to")}
        return command_response(await run_command("versions.rollback", payload))


def _add_train_routes(router: APIRouter, admin: RouteGuard, run_command: RunCommand,
                      max_body_bytes: int) -> None:
    @router.post("/alchemist/train/pause")
    @admin
    async def alchemist_train_pause(request: Request) -> JSONResponse:
        return command_response(await run_command("train.pause", {}))

    @router.post("/alchemist/train/resume")
    @admin
    async def alchemist_train_resume(request: Request) -> JSONResponse:
        return command_response(await run_command("train.resume", {}))

    @router.post("/alchemist/train/replay")
    @admin
    async def alchemist_train_replay(request: Request) -> JSONResponse:
        body = await _json_object(request, max_body_bytes)
        check_keys(body, ("enabled",), "")
        if not isinstance(body.get("enabled"), bool):
            raise FieldError("enabled", "must be true or false")
        return command_response(await run_command("train.replay", {"enabled": body["enabled"]}))

    @router.post("/alchemist/train/samples")
    @admin
    async def alchemist_train_samples(request: Request) -> JSONResponse:
        samples = normalize_samples(await _json_object(request, max_body_bytes))
        return command_response(await run_command("train.samples", {"samples": samples}))


def _add_command_route(router: APIRouter, admin: RouteGuard, run_command: RunCommand,
                       max_body_bytes: int) -> None:
    @router.post("/alchemist/commands/{kind}")
    @admin
    async def alchemist_command(kind: str, request: Request) -> JSONResponse:
        payload = await _json_object(request, max_body_bytes, is_empty_ok=True)
        return command_response(await run_command(kind, payload), is_wrapped=True)


def command_response(outcome: CommandResult, *, is_wrapped: bool = False) -> JSONResponse:
    """The HTTP answer for a command's outcome (Note [command errors]). A success answers the
    result as is, or ``{"result": ...}`` when ``is_wrapped`` (the generic command route)."""
    if not outcome.is_done:
        return JSONResponse(status_code=504, content={"error": "the scheduler did not answer the command"})
    if outcome.is_ok:
        return JSONResponse(content={"result": outcome.result} if is_wrapped else outcome.result)
    error = outcome.result if isinstance(outcome.result, dict) else {"error": str(outcome.result)}
    status = error.get("http_status")
    if isinstance(status, bool) or not isinstance(status, int) or not 400 <= status <= 599:
        status = 404 if error.get("is_unknown") else 422
    content: dict[str, object] = {"error": str(error.get("error", "command failed"))}
    if error.get("field") is not None:
        content["field"] = error["field"]
    return JSONResponse(status_code=status, content=content)


async def _json_object(request: Request, max_body_bytes: int, *, is_empty_ok: bool = False) -> dict[str, Any]:
    """The request body as a JSON object (http.read_body / parse_json); 413 beyond
    ``max_body_bytes``; 422 otherwise. ``is_empty_ok``: an empty body reads as ``{}``."""
    raw = await read_body(request, max_body_bytes)
    if is_empty_ok and not raw.strip():
        return {}
    body = parse_json(raw)
    if not isinstance(body, dict):
        raise FieldError("body", "must be a JSON object")
    return body
