"""HTTP routes of alchemist-sgl (run in SGLang's HTTP process) and their schemas.

Owns the ``/alchemist/*`` routes. Data owned by the scheduler process is reached through injected
async callables (built in ``integration/`` over SGLang's existing control channel and the SQLite
command table of ``control.py``), so this module imports no sglang and is testable with fakes.
"""

from __future__ import annotations

import json
from typing import Any, Awaitable, Callable

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from alchemist_sgl.control import CommandResult

FetchSchedulerState = Callable[[], Awaitable[dict[str, Any] | None]]
RunCommand = Callable[[str, dict[str, Any]], Awaitable[CommandResult]]


def build_router(fetch_status: FetchSchedulerState, run_command: RunCommand) -> APIRouter:
    """Routes: ``GET /alchemist/status``, ``POST /alchemist/commands/{kind}``."""
    router = APIRouter()

    @router.get("/alchemist/status")
    async def alchemist_status() -> JSONResponse:
        status = await fetch_status()
        if status is None:
            return JSONResponse(
                status_code=503,
                content={"error": "the alchemist plugin is not active in the scheduler process; "
                                  "see the server log for the reason"})
        return JSONResponse(content=status)

    @router.post("/alchemist/commands/{kind}")
    async def alchemist_command(kind: str, request: Request) -> JSONResponse:
        raw = await request.body()
        try:
            payload = json.loads(raw) if raw.strip() else {}
        except json.JSONDecodeError as exc:
            return JSONResponse(status_code=422, content={"error": f"body is not JSON: {exc.msg}"})
        if not isinstance(payload, dict):
            return JSONResponse(status_code=422, content={"error": "body must be a JSON object"})
        outcome = await run_command(kind, payload)
        if not outcome.is_done:
            return JSONResponse(status_code=504, content={"error": "the scheduler did not answer the command"})
        if outcome.is_ok:
            return JSONResponse(content={"result": outcome.result})
        error = outcome.result if isinstance(outcome.result, dict) else {"error": str(outcome.result)}
        return JSONResponse(status_code=404 if error.get("is_unknown") else 422,
                            content={"error": error.get("error", "command failed")})

    return router
