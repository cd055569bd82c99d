"""``GET /metrics`` (HTTP process): SGLang's Prometheus metrics, when it collects them, plus ours.

Owns the route. With ``--enable-metrics`` SGLang's processes write prometheus_client multiprocess
files (``PROMETHEUS_MULTIPROC_DIR``); this route collects them the way SGLang's own endpoint does,
then appends the ``alchemist_*`` families (metrics_text.py) from the scheduler's status, the feedback
table's counts by label and the feedback routes' answers by code. Registered before SGLang's app
is launched, so it answers ``/metrics`` in place of SGLang's own mount. Imports no sglang.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any, Awaitable, Callable

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse

from alchemist_sgl.api.metrics_text import render_alchemist_metrics

_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _sglang_metrics() -> str:
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not folder or not os.path.isdir(folder):
        return ""
    from prometheus_client import CollectorRegistry, generate_latest  # noqa: PLC0415
    from prometheus_client.multiprocess import MultiProcessCollector  # noqa: PLC0415

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=folder)  # type: ignore[no-untyped-call]  # unannotated upstream
    return generate_latest(registry).decode("utf-8")


def build_metrics_router(fetch_status: Callable[[], Awaitable[dict[str, Any] | None]],
                         feedback_by_label: Callable[[], dict[str, int]],
                         answers_by_code: dict[int, int]) -> APIRouter:
    router = APIRouter()

    @router.get("/metrics")
    async def metrics() -> PlainTextResponse:
        status = await fetch_status()
        labels = await asyncio.to_thread(feedback_by_label)
        sglang = await asyncio.to_thread(_sglang_metrics)
        ours = render_alchemist_metrics(status, labels, dict(answers_by_code))
        return PlainTextResponse(sglang + ours, media_type=_CONTENT_TYPE)

    return router
