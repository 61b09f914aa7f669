"""GET /v1/models: the one served model, with its ladder."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request

router = APIRouter()
STARTED = int(time.time())


@router.get("/v1/models")
async def list_models(request: Request) -> dict:
    model = request.app.state.model
    entry = {"id": request.app.state.settings.model_name, "object": "model", "created": STARTED,
             "owned_by": "longrope-serve", "max_model_len": model.max_model_len}
    if model.ladder is not None:
        entry["rope_sets"] = [{"name": fs.name, "window": fs.window} for fs in model.ladder.sets]
    return {"object": "list", "data": [entry]}
