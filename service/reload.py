"""Loading a model into the running app, at start and on reload, and swapping it in atomically.

The app serves whatever `app.state.inference` points at. A reload loads, verifies and warms up the
new artifact on a worker thread (the event loop keeps serving), builds a new Inference with its
own batchers, and only then swaps the pointer: new requests get the new model, requests already
holding the old one finish on it, and the old one is stopped once none holds it. A failure at any
step leaves the old model serving; there is never a half-loaded model behind the pointer.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.concurrency import run_in_threadpool

from . import workers
from .errors import ArtifactError
from .inference import Inference
from .runtime import ModelRuntime
from .settings import Settings

log = logging.getLogger("service")


@dataclass
class Loaded:
    runtime: ModelRuntime
    warm_up_seconds: float


def load_and_warm_up(path: Path, settings: Settings) -> Loaded:
    """Blocking: load, check and warm up an artifact; any failure is one ArtifactError."""
    runtime = ModelRuntime.load(path, settings.verify_checksum, settings.torch_threads)
    try:
        seconds = runtime.warm_up()
    except Exception as error:      # a scripted model that cannot run its own methods is not servable
        raise ArtifactError(f"{path} loaded but failed its warm-up ({type(error).__name__})") from None
    return Loaded(runtime, seconds)


def start_serving(app: Any, runtime: ModelRuntime) -> Inference:
    """Make `runtime` the model new requests get; returns the inference it replaced, if any."""
    settings: Settings = app.state.settings
    metrics = app.state.metrics
    inference = Inference(runtime, settings, metrics)
    inference.start()
    previous, app.state.inference = app.state.inference, inference       # the swap: one assignment
    app.state.load_error = None
    metrics.serving(name=runtime.name, sha256=runtime.sha256, score_kind=runtime.score_kind,
                    format_version=str(runtime.metadata["format_version"]))
    metrics.ready.set(1)
    if settings.default_fpr < runtime.min_fpr:
        log.warning("VAE_DEFAULT_FPR=%g is below what %d calibration scores support (%.3g): /anomaly-score "
                    "answers 422 unless a request passes a larger fpr", settings.default_fpr,
                    len(runtime.calibration_scores), runtime.min_fpr)
    return previous


def freeze_long_lived(unfreeze_first: bool = False) -> None:
    """Hide every object alive now from the garbage collector. What start-up made (torch, the model,
    FastAPI: some 200,000 objects) lives as long as the process, and a full collection walking it
    paused the event loop for 100+ ms, which set the p99 under load; frozen, it takes microseconds.
    Called again after a reload retires the old model: unfrozen first, so the old model's reference
    cycles are freed (one full collection) instead of kept forever."""
    if unfreeze_first:
        gc.unfreeze()
    gc.collect()
    gc.freeze()


async def retire(previous: Inference) -> None:
    await previous.retire()
    freeze_long_lived(unfreeze_first=True)


def allowed_artifact(requested: str | None, app: Any) -> Path:
    """The artifact a reload may load: by default the one served now (or the configured one);
    a name given over the network must lie inside the models directory, symlinks resolved."""
    settings: Settings = app.state.settings
    if requested is None:
        current = app.state.inference
        return current.runtime.path if current is not None else settings.model_path
    models_dir = (settings.models_dir or settings.model_path.parent).resolve()
    candidate = (models_dir / requested).resolve()
    if not candidate.is_relative_to(models_dir) or candidate == models_dir:
        raise PermissionError(f"{requested!r} is not inside the models directory; name an artifact in it, "
                              "relative to it (VAE_MODELS_DIR)")
    return candidate


class ReloadInProgress(Exception):
    pass


async def reload_model(app: Any, requested: str | None) -> dict[str, Any]:
    """Load `requested` (see allowed_artifact) and serve it; raises PermissionError, ArtifactError or
    ReloadInProgress with the old model still serving."""
    lock: asyncio.Lock = app.state.reload_lock
    if lock.locked():
        raise ReloadInProgress("another reload is running; try again when it has finished")
    async with lock:
        path = allowed_artifact(requested, app)
        started = time.perf_counter()
        try:
            loaded = await run_in_threadpool(load_and_warm_up, path, app.state.settings)
        except ArtifactError:
            app.state.metrics.reloads.labels("failed").inc()
            raise
        if workers.several():
            return roll_out(app, loaded.runtime, started)
        previous = start_serving(app, loaded.runtime)
        if previous is not None:
            retiring = asyncio.get_running_loop().create_task(retire(previous), name="retire-model")
            app.state.retiring.add(retiring)
            retiring.add_done_callback(app.state.retiring.discard)
        app.state.metrics.reloads.labels("ok").inc()
        runtime = loaded.runtime
        log.info("reloaded: now serving %s (%s, sha256 %s…) in %.2f s", runtime.name, runtime.path.name,
                 runtime.sha256[:12], time.perf_counter() - started)
        return {"status": "reloaded", "model": runtime.name, "artifact": runtime.path.name, "sha256": runtime.sha256,
                "previous_sha256": previous.runtime.sha256 if previous is not None else None,
                "seconds": round(time.perf_counter() - started, 3)}


def roll_out(app: Any, runtime: ModelRuntime, started: float) -> dict[str, Any]:
    """With several workers: the artifact has loaded and warmed up here, so every worker is replaced
    by one serving it, one at a time (service/workers.py); this one keeps serving until its turn."""
    workers.roll_out(runtime.path)
    app.state.metrics.reloads.labels("ok").inc()
    current = app.state.inference
    log.info("reload: %s (sha256 %s…) verified; replacing the workers one by one", runtime.path.name,
             runtime.sha256[:12])
    return {"status": "rolling out", "model": runtime.name, "artifact": runtime.path.name, "sha256": runtime.sha256,
            "previous_sha256": current.runtime.sha256 if current is not None else None,
            "seconds": round(time.perf_counter() - started, 3)}
