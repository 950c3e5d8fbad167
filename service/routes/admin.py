"""Operator endpoints: POST /admin/reload swaps in a new artifact without a restart.

Behind the API key (the key middleware protects every path not listed as open). With no keys
configured the endpoint is refused unless VAE_ADMIN_WITHOUT_KEYS says the network is trusted:
anyone who can reach an open server could otherwise swap its model."""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field
from starlette.responses import Response

from ..deps import SettingsDep
from ..errors import ArtifactError, ServiceError
from ..reload import ReloadInProgress, reload_model
from ..schemas import FastJSONResponse

router = APIRouter(prefix="/admin", tags=["admin"])


class Forbidden(ServiceError):
    status_code = 403


class Conflict(ServiceError):
    status_code = 409


class ReloadFailed(ServiceError):
    status_code = 422


class ReloadRequest(BaseModel):
    path: str | None = Field(None, max_length=1024, examples=["fashion.pt"],
                             description="an artifact inside the models directory (VAE_MODELS_DIR, default the "
                                         "served artifact's directory), relative to it; none: reload the "
                                         "artifact served now from disk")


class ReloadResponse(BaseModel):
    status: str = Field(..., examples=["reloaded"])
    model: str
    artifact: str
    sha256: str
    previous_sha256: str | None
    seconds: float


RELOAD_ERRORS = {403: {"description": "admin disabled (no API keys), or a path outside the models directory"},
                 409: {"description": "another reload is running"},
                 422: {"description": "the artifact is missing, corrupt or not servable; the old model still serves"}}


@router.post("/reload", response_model=ReloadResponse, responses=RELOAD_ERRORS)
async def reload(request: Request, settings: SettingsDep, body: ReloadRequest | None = None) -> Response:
    """Load an artifact, verify its sha256, warm it up off the event loop, then swap it in: requests
    already running finish on the old model, new ones get the new one. On failure nothing changes."""
    if not settings.api_keys and not settings.admin_without_keys:
        raise Forbidden("admin endpoints are disabled while no API keys are configured: set VAE_API_KEYS "
                        "(or VAE_ADMIN_WITHOUT_KEYS=true on a trusted network)")
    try:
        result = await reload_model(request.app, body.path if body else None)
    except PermissionError as error:
        raise Forbidden(str(error)) from None
    except ReloadInProgress as error:
        raise Conflict(str(error)) from None
    except ArtifactError as error:
        current = request.app.state.inference
        still = f"; still serving sha256 {current.runtime.sha256[:12]}…" if current is not None else ""
        raise ReloadFailed(f"reload failed: {error}{still}") from None
    return FastJSONResponse(result)
