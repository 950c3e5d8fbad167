"""The app factory: `create_app(settings)` builds the FastAPI app; its lifespan loads the artifact,
warms the model up, and starts and stops the batchers."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

from .errors import ArtifactError, ServiceError
from .inference import Inference
from .metrics import Metrics
from .middleware import BodyLimitMiddleware, InternalErrorMiddleware, RequestMetricsMiddleware
from .routes import generate, images, kserve, meta, page
from .runtime import ModelRuntime
from .settings import Settings

log = logging.getLogger("service")

DESCRIPTION = """Encode, decode, reconstruct, sample and score images for anomalies with a variational
autoencoder exported by `python -m training train`. Images go in as multipart uploads (`files`), as
one raw image body, or as JSON (`{"images": [...]}`: base64 files or nested lists in [0, 1]).
Every error is JSON with a readable `detail`."""


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    try:
        runtime = ModelRuntime.load(settings.model_path, settings.verify_checksum, settings.torch_threads)
        seconds = runtime.warm_up()
    except ArtifactError as error:
        # one clear line, no traceback; the process stays up so /readyz can say why it is not ready
        log.error("cannot serve a model: %s", error)
        app.state.load_error = str(error)
    else:
        app.state.inference = Inference(runtime, settings, app.state.metrics)
        app.state.inference.start()
        app.state.metrics.model.info({"name": runtime.name, "sha256": runtime.sha256, "score_kind": runtime.score_kind,
                                      "format_version": str(runtime.metadata["format_version"])})
        app.state.metrics.ready.set(1)
        log.info("serving %s (%s, sha256 %s…), warm-up %.2f s", runtime.name, settings.model_path,
                 runtime.sha256[:12], seconds)
        if settings.default_fpr < runtime.min_fpr:
            log.warning("VAE_DEFAULT_FPR=%g is below what %d calibration scores support (%.3g): /anomaly-score "
                        "answers 422 unless a request passes a larger fpr", settings.default_fpr,
                        len(runtime.calibration_scores), runtime.min_fpr)
    try:
        yield
    finally:
        app.state.metrics.ready.set(0)
        if app.state.inference is not None:
            await app.state.inference.stop()


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    app = FastAPI(title="VAE inference service", version="1.0", description=DESCRIPTION, lifespan=lifespan)
    app.state.settings = settings
    app.state.metrics = Metrics()
    app.state.inference = None
    app.state.load_error = None
    add_error_handlers(app)
    # the last added is the outermost: metrics see every status, including the 500s and 413s below them
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(InternalErrorMiddleware)
    app.add_middleware(RequestMetricsMiddleware, metrics=app.state.metrics)
    for router in (images.router, generate.router, meta.router, kserve.router, page.router):
        app.include_router(router)
    app.mount("/static", page.static_files(), name="static")
    return app


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
        return JSONResponse({"detail": str(error.detail)}, status_code=error.status_code,
                            headers=getattr(error, "headers", None))
