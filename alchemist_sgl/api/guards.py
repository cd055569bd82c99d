"""ASGI middlewares that alchemist-sgl puts in front of SGLang's own HTTP routes.

Owns three guards, each added to a given Starlette/FastAPI ``app`` before it starts:
``refuse_weight_routes`` (SGLang's weight-changing routes answer 403, Note [weight routes]),
``pin_model_names`` (``model: "<name>@<version>"`` on the OpenAI routes, docs/api.md "Model
names") and ``guard_request_fields`` (no client ``rid``; ``store: false`` kept). All are pure ASGI (no ``BaseHTTPMiddleware``), so streaming responses and client
disconnects pass through unchanged. Imports no sglang: it must be importable in the unit tests.
"""

from __future__ import annotations

import json
from typing import Any, Callable

from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Note [weight routes]: SGLang's routes that replace, reload, stream in or offload the served
# weights (or adapters) without going through us. The served weights are rebuilt from the fp32
# master copy after each training step and every change needs a version id (radix namespace, store
# namespace, SGLang's weight_version), so any of these would serve weights that the next publish
# silently overwrites, or mix versions under one id. Checked against sglang 0.5.23's http_server;
# read-only routes (/get_weights_by_name, /weights_checker) stay open.
REFUSED_WEIGHT_ROUTES: tuple[str, ...] = (
    "/update_weights_from_disk",
    "/update_weights_from_tensor",
    "/update_weights_from_distributed",
    "/update_weights_from_ipc",
    "/init_weights_update_group",
    "/init_weights_send_group_for_remote_instance",
    "/send_weights_to_remote_instance",
    "/update_weight_version",
    "/begin_weight_update",
    "/end_weight_update",
    "/load_lora_adapter",
    "/unload_lora_adapter",
    "/load_lora_adapter_from_tensors",
    "/release_memory_occupation",
    "/resume_memory_occupation",
)

# The OpenAI routes whose ``model`` field may carry a version pin.
PINNED_ROUTES: tuple[str, ...] = ("/v1/chat/completions", "/v1/completions")


def refuse_weight_routes(app: Starlette) -> None:
    """Adds ``WeightRouteGuard`` to ``app`` (before it starts; Starlette refuses later)."""
    app.add_middleware(WeightRouteGuard)


def pin_model_names(app: Starlette, served_name: str, serving_version: Callable[[], str]) -> None:
    """Adds ``ModelNamePins`` to ``app`` (before it starts). ``serving_version`` returns the version
    serving now (``"v3"``); it is called on the event loop for each pinned request, so it must be
    cheap and must not block."""
    app.add_middleware(ModelNamePins, served_name=served_name, serving_version=serving_version)


class WeightRouteGuard:
    """Answers 403 ``{"error": ...}`` to every HTTP request for a ``REFUSED_WEIGHT_ROUTES`` path,
    whatever the method; everything else goes to the wrapped app untouched."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._refused = frozenset(REFUSED_WEIGHT_ROUTES)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = _route_path(scope) if scope["type"] == "http" else ""
        if route not in self._refused:
            await self.app(scope, receive, send)
            return
        response = JSONResponse(status_code=403, content={
            "error": f"{route} is disabled by alchemist-sgl: the served weights are rebuilt from the "
                     "master copy after each training step and every change needs a version id; "
                     "use POST /alchemist/rollback or the training routes"})
        await response(scope, receive, send)


class ModelNamePins:
    """Version pins in the OpenAI ``model`` field (docs/api.md, "Model names").

    For ``POST`` to ``PINNED_ROUTES`` whose JSON body has ``model == "<served_name>@<pin>"``: when the
    pin is the serving version the body goes on with ``model = served_name`` (Content-Length fixed);
    any other pin (an older ``vN``, ``base``, empty) answers 404 in OpenAI's error shape, naming the
    serving version. A body without ``@`` is passed on byte for byte without being parsed; one with
    ``@`` elsewhere, or with another model name, is parsed once and passed on untouched. The body is
    replayed to the wrapped app as one message; later ``receive`` calls reach the client's, so
    disconnects still arrive and the response (streamed or not) is not touched.
    """

    def __init__(self, app: ASGIApp, *, served_name: str, serving_version: Callable[[], str]) -> None:
        self.app = app
        self.served_name = served_name
        self.serving_version = serving_version
        self._prefix = served_name + "@"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or _route_path(scope) not in PINNED_ROUTES:
            await self.app(scope, receive, send)
            return
        body = await _read_body(receive)
        if body is None:  # the client left before sending its body: nobody to answer
            return
        model = _pinned_model(body, self._prefix)
        if model is None:
            await self.app(scope, _replay(body, receive), send)
            return
        data, pin = model
        serving = self.serving_version()
        if pin != serving:
            message = (f"model '{self._prefix}{pin}' is not served: the serving version is {serving} "
                       f"(use '{self.served_name}' or '{self._prefix}{serving}')")
            response = JSONResponse(status_code=404, content={
                "error": {"message": message, "type": "NotFoundError", "code": 404}})
            await response(scope, receive, send)
            return
        data["model"] = self.served_name
        rewritten = json.dumps(data, ensure_ascii=False).encode("utf-8")
        await self.app(_with_content_length(scope, len(rewritten)), _replay(rewritten, receive), send)


def _pinned_model(body: bytes, prefix: str) -> tuple[dict[str, Any], str] | None:
    """(parsed body, pin) when ``model`` is ``<prefix><pin>``; None to pass the body on untouched."""
    if b"@" not in body and b"\\u0040" not in body:  # the common case: no pin, no parse
        return None
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None  # malformed: the wrapped app reports it in its own words
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, str) or not model.startswith(prefix):
        return None
    return data, model[len(prefix):]


async def _read_body(receive: Receive) -> bytes | None:
    """The whole request body, or None if the client disconnected first."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that yields ``body`` once, then defers to the client's (disconnects)."""
    is_sent = False

    async def replay() -> Message:
        nonlocal is_sent
        if is_sent:
            return await receive()
        is_sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


def _with_content_length(scope: Scope, length_bytes: int) -> Scope:
    headers = [(name, value) for name, value in scope["headers"]
               if name.lower() not in (b"content-length", b"transfer-encoding")]
    headers.append((b"content-length", str(length_bytes).encode("ascii")))
    return {**scope, "headers": headers}


def _route_path(scope: Scope) -> str:
    """The path without the app's root_path or a trailing slash."""
    path: str = scope.get("path", "")
    root: str = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):]
    return path.rstrip("/") or "/"


# Routes whose requests become completions that feedback can refer to.
COMPLETION_ROUTES = ("/v1/chat/completions", "/v1/completions", "/generate")


def guard_request_fields(app: Starlette) -> None:
    """Adds ``RequestFieldGuard`` (Note [Server-made ids and store: false])."""
    app.add_middleware(RequestFieldGuard)


class RequestFieldGuard:
    """Note [Server-made ids and store: false]: a completion id is the scheduler's rid, so a
    client-chosen ``rid`` could make feedback land on another client's completion: it is refused
    (422). OpenAI's ``store: false`` is mapped to ``custom_params.alchemist.store = false`` (never
    logged, recorded or trained), because SGLang 0.5.23 silently drops ``store`` from chat and
    completion requests. Bodies that mention neither key pass through unparsed."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or _route_path(scope) not in COMPLETION_ROUTES:
            await self.app(scope, receive, send)
            return
        body = await _read_body(receive)
        if body is None:
            return
        if b'"rid"' not in body and b'"store"' not in body:
            await self.app(scope, _replay(body, receive), send)
            return
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError):
            await self.app(scope, _replay(body, receive), send)  # SGLang reports it
            return
        if not isinstance(data, dict):
            await self.app(scope, _replay(body, receive), send)
            return
        if data.get("rid") is not None:
            response = JSONResponse(status_code=422, content={"error": {
                "message": "rid: completion ids are chosen by the server (the response 'id'); "
                           "remove 'rid' from the request", "type": "BadRequestError",
                "param": "rid", "code": 422}})
            await response(scope, receive, send)
            return
        if "store" in data and _route_path(scope) != "/generate":
            store = data.pop("store")
            if store is False:
                custom = data.get("custom_params")
                custom = dict(custom) if isinstance(custom, dict) else {}
                ours = dict(custom.get("alchemist") or {})
                ours["store"] = False
                custom["alchemist"] = ours
                data["custom_params"] = custom
        rewritten = json.dumps(data, ensure_ascii=False).encode("utf-8")
        await self.app(_with_content_length(scope, len(rewritten)), _replay(rewritten, receive), send)
