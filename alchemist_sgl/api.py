"""HTTP routes of alchemist-sgl (run in SGLang's HTTP process) and their schemas.

Owns the ``/alchemist/*`` routes. Data owned by the scheduler process is fetched through an
injected async callable (built in ``integration/`` over SGLang's existing control channel), so
this module imports no sglang and is testable with a fake fetcher.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable

from fastapi import APIRouter
from fastapi.responses import JSONResponse

FetchSchedulerState = Callable[[], Awaitable[dict[str, Any] | None]]


def build_router(fetch_status: FetchSchedulerState) -> APIRouter:
    """Routes: ``GET /alchemist/status``."""
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

    return router
