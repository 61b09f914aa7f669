"""The app factory: ``create_app(settings, model)`` wires middleware, error handlers and routers."""

from __future__ import annotations

import asyncio
import hmac
import uuid
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse

from server.errors import APIError, error_body, install_handlers
from server.metrics import ServerMetrics
from server.settings import ServerSettings


def require_key(request: Request) -> None:
    """Bearer-key check in constant time against every configured key; open when none are set."""
    keys: list[str] = request.app.state.settings.api_keys
    if not keys:
        return
    header = request.headers.get("authorization", "")
    given = header[7:] if header.lower().startswith("bearer ") else ""
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given.encode(), key.encode())
    if not matched:
        raise APIError(401, "Incorrect API key provided.", "invalid_request_error", code="invalid_api_key")


def create_app(settings: ServerSettings, model, start_engine: bool = True) -> FastAPI:
    from server.routes import chat, completions, health, metrics, models

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        task = asyncio.create_task(model.start()) if start_engine else None
        yield
        if task is not None and not task.done():
            task.cancel()
        model.shutdown()

    app = FastAPI(title="longrope-serve", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.model = model
    app.state.metrics = ServerMetrics(settings.model_name)
    install_handlers(app)

    @app.middleware("http")
    async def request_id_and_body_limit(request: Request, call_next):
        request_id = request.headers.get("x-request-id") or f"req-{uuid.uuid4().hex}"
        request.state.request_id = request_id
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > settings.max_body_bytes:
            response = JSONResponse(
                error_body(f"Request body of {length} bytes exceeds the limit of {settings.max_body_bytes} bytes.",
                           "invalid_request_error", code="request_too_large"),
                status_code=413,
            )
        else:
            response = await call_next(request)
        response.headers["X-Request-Id"] = request_id
        route = request.scope.get("route")
        app.state.metrics.http.labels(getattr(route, "path", "unmatched"), request.method,
                                      str(response.status_code)).inc()
        return response

    keyed = [Depends(require_key)]
    app.include_router(health.router)
    app.include_router(metrics.router)
    app.include_router(models.router, dependencies=keyed)
    app.include_router(chat.router, dependencies=keyed)
    app.include_router(completions.router, dependencies=keyed)
    return app
