"""The app factory: `create_app(settings)` builds the FastAPI app; its lifespan loads the artifact,
warms the model up, and starts and stops the batchers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse

from . import workers
from .auth import APIKeyMiddleware, KeyRing
from .errors import ArtifactError, ServiceError
from .fast_lane import AnomalyScoreLane
from .logs import report_drops_to
from .metrics import Metrics
from .middleware import BodyLimitMiddleware, InFlightLimitMiddleware, InternalErrorMiddleware, RequestMetricsMiddleware
from .openapi import service_openapi
from .reload import freeze_long_lived, load_and_warm_up, reload_model, start_serving
from .routes import admin, generate, images, kserve, meta, page
from .settings import Settings

log = logging.getLogger("service")

DESCRIPTION = """Encode, decode, reconstruct, sample and score images for anomalies with a variational
autoencoder exported by `python -m training train`. Images go in as multipart uploads (`files`), as
one raw image body, or as JSON (`{"images": [...]}`: base64 files or nested lists in [0, 1]).
Every error is JSON with a readable `detail`."""


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    app.state.reload_lock = asyncio.Lock()
    path = workers.artifact_to_serve(settings.model_path)
    try:
        loaded = await asyncio.to_thread(load_and_warm_up, path, settings)
    except ArtifactError as error:
        if workers.has_served():
            # a new worker of a rolling restart: failing its start-up keeps the old worker serving
            log.error("cannot serve a model, so this new worker stops and the running ones stay: %s", error)
            raise
        # one clear line, no traceback; the process stays up so /readyz can say why it is not ready
        log.error("cannot serve a model: %s", error)
        app.state.load_error = str(error)
    else:
        start_serving(app, loaded.runtime)
        workers.mark_served()
        log.info("serving %s (%s, sha256 %s…), warm-up %.2f s", loaded.runtime.name, path,
                 loaded.runtime.sha256[:12], loaded.warm_up_seconds)
    report_drops_to(app.state.metrics.log_records_dropped.inc)
    freeze_long_lived()
    watchdog = asyncio.get_running_loop().create_task(workers.exit_with_the_supervisor()) if workers.several() else None
    hangup = install_reload_on_sighup(app)
    try:
        yield
    finally:
        # uvicorn has stopped accepting and waited for open requests by now; drain what is left
        if hangup:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        if watchdog is not None:
            watchdog.cancel()
        app.state.metrics.ready.set(0)
        report_drops_to(None)
        await asyncio.gather(*app.state.retiring, return_exceptions=True)
        if app.state.inference is not None:
            await app.state.inference.stop()
        workers.worker_exiting()


def install_reload_on_sighup(app: FastAPI) -> bool:
    """`kill -HUP <pid>` reloads the served artifact from disk, like POST /admin/reload with no body.
    Only in the main thread of a process (a signal handler cannot be set elsewhere)."""
    if not hasattr(signal, "SIGHUP") or threading.current_thread() is not threading.main_thread():
        return False
    loop = asyncio.get_running_loop()

    async def reload_logged() -> None:
        try:
            await reload_model(app, None)
        except Exception as error:       # the old model keeps serving; say why in one line
            log.error("SIGHUP reload failed, still serving the previous model: %s", error)

    def on_hangup() -> None:
        task = loop.create_task(reload_logged(), name="sighup-reload")
        app.state.retiring.add(task)                 # keeps a reference until it is done
        task.add_done_callback(app.state.retiring.discard)

    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
        loop.add_signal_handler(signal.SIGHUP, on_hangup)
        return True
    return False


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    app = FastAPI(title="VAE inference service", version="1.0", description=DESCRIPTION, lifespan=lifespan)
    app.state.settings = settings
    app.state.metrics = Metrics()
    app.state.inference = None
    app.state.load_error = None
    app.state.retiring = set()                       # old models finishing their requests after a reload
    add_error_handlers(app)
    add_middleware(app, settings)
    for router in (images.router, generate.router, meta.router, kserve.router, admin.router, page.router):
        app.include_router(router)
    app.mount("/static", page.static_files(), name="static")
    app.openapi = lambda: service_openapi(app)
    return app


def add_middleware(app: FastAPI, settings: Settings) -> None:
    """The last added is the outermost. From the outside in: metrics and access logs (they see every
    status), CORS (so browsers can read errors too), the 500 guard, API keys, the in-flight limit
    and the body limit, all before any handler reads a byte of the body; innermost, the lean path
    for one raw image to /anomaly-score."""
    if settings.fast_lane:
        app.add_middleware(AnomalyScoreLane, settings=settings, metrics=app.state.metrics)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(InFlightLimitMiddleware, limit=settings.max_requests_in_flight, metrics=app.state.metrics)
    app.add_middleware(APIKeyMiddleware, keys=KeyRing(settings.api_keys), public_metrics=settings.public_metrics)
    app.add_middleware(InternalErrorMiddleware)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "X-API-Key", "Content-Type", "Accept", "X-Request-ID"],
                           expose_headers=CORS_EXPOSED_HEADERS, max_age=600)
    app.add_middleware(RequestMetricsMiddleware, metrics=app.state.metrics)


FASTAPI_PARSE_ERROR = "There was an error parsing the body"

# the response headers a browser script may read: the request id, overload advice, and what
# travels in headers beside a PNG or float32 body
CORS_EXPOSED_HEADERS = ["X-Request-ID", "Retry-After", "X-Anomaly-Score", "X-P-Value", "X-Is-Anomaly",
                        "X-Threshold", "X-Reconstruction-Errors", "X-Shape", "X-Dtype"]


def add_error_handlers(app: FastAPI) -> None:
    """Every error becomes JSON with a readable `detail` (unexpected ones: InternalErrorMiddleware)."""

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, error: ServiceError) -> JSONResponse:
        return JSONResponse({"detail": error.detail}, status_code=error.status_code, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = [f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', 'invalid')}"
                    for e in error.errors()]
        return JSONResponse({"detail": "; ".join(problems) or "invalid request"}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        detail = str(error.detail)
        if detail == FASTAPI_PARSE_ERROR:              # FastAPI's words for any body it cannot decode
            detail = "the body is not JSON this service can read: malformed, or nested too deeply"
        return JSONResponse({"detail": detail}, status_code=error.status_code,
                            headers=getattr(error, "headers", None))
