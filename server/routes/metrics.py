"""Prometheus exposition: vLLM's engine metrics (the default registry), then ours (server/metrics.py)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

router = APIRouter()


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    ours = request.app.state.metrics.registry
    return Response(generate_latest(REGISTRY) + generate_latest(ours), media_type=CONTENT_TYPE_LATEST)
