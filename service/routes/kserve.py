"""The Open Inference Protocol (KServe V2 / Triton "v2" REST) beside the service's own API.

Tensor clients (KServe, Triton's tritonclient, MLServer tooling) can call the model through
`/v2/...`: server and model metadata, liveness and readiness, and `infer` with JSON tensors. One
input, `images` (FP32 or FP64, [N, C, H, W], values in [0, 1]); outputs `score`, `p_value`,
`is_anomaly` (the default three), `mu`, `log_var` and `reconstruction`, all computed through the
same batchers as the rest of the API. Errors follow the v2 spec, not the rest of the API: JSON
`{"error": "..."}`, 400 for a bad request and 404 for an unknown model (instead of `{"detail"}`
and 422). Only JSON tensor data is taken: the binary data extension is not offered.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.metadata
import json
import math
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from ..deps import InferenceDep, MetricsDep, SettingsDep, current_inference
from ..errors import ServiceError
from ..inference import Inference
from ..runtime import ModelRuntime
from ..schemas import FastJSONResponse

INPUT_NAME = "images"
INPUT_DATATYPES = ("FP32", "FP64")
DEFAULT_OUTPUTS = ("score", "p_value", "is_anomaly")
PLATFORM = "pytorch_libtorch"          # Triton's name for TorchScript models
SERVER_NAME = "vae-service"


@dataclass(frozen=True)
class OutputSpec:
    datatype: str
    operation: str                      # the Inference operation that computes it
    dims: str                           # "n": [N], "nd": [N, latent], "nchw": [N, C, H, W]


OUTPUTS = {
    "score": OutputSpec("FP32", "score", "n"),
    "p_value": OutputSpec("FP64", "score", "n"),
    "is_anomaly": OutputSpec("BOOL", "score", "n"),
    "mu": OutputSpec("FP32", "encode", "nd"),
    "log_var": OutputSpec("FP32", "encode", "nd"),
    "reconstruction": OutputSpec("FP32", "reconstruct", "nchw"),
}


class V2Error(Exception):
    """A client error on a v2 route; answered as `{"error": message}`."""

    def __init__(self, message: str, status_code: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code


def error_response(message: str, status_code: int, headers: dict[str, str] | None = None) -> Response:
    return FastJSONResponse({"error": message}, status_code=status_code, headers=headers)


class V2Route(APIRoute):
    """Answers every error of a v2 handler in the spec's form. The app's own handlers would write
    `{"detail"}`, and service errors (overload, body too large, no model) reach here first."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except V2Error as error:
                return error_response(error.message, error.status_code)
            except ServiceError as error:
                # our 422 (bad content) is the spec's 400; 413, 415 and 503 keep their meaning
                status = 400 if error.status_code == 422 else error.status_code
                return error_response(error.detail, status, error.headers)
            except RequestValidationError as error:
                problems = "; ".join(str(e.get("msg", "invalid")) for e in error.errors())
                return error_response(problems or "invalid request", 400)

        return handle


router = APIRouter(prefix="/v2", tags=["open inference protocol (v2)"], route_class=V2Route)
ERRORS = {400: {"description": 'bad request: `{"error": "..."}`'},
          404: {"description": 'unknown model or version: `{"error": "..."}`'},
          503: {"description": 'no model loaded, or overloaded: `{"error": "..."}`'}}


# ---- server -----------------------------------------------------------------------------------

@functools.cache
def package_version() -> str | None:
    try:
        return importlib.metadata.version(SERVER_NAME)
    except importlib.metadata.PackageNotFoundError:    # run from a source tree, not installed
        return None


@router.get("")
async def server_metadata(request: Request) -> Response:
    """Server metadata: name, version (the package's, else the API's), and the protocol extensions
    offered (none)."""
    version = package_version() or request.app.version
    return FastJSONResponse({"name": SERVER_NAME, "version": version, "extensions": []})


@router.get("/health/live")
async def server_live() -> Response:
    """200 while the process lives."""
    return FastJSONResponse({"live": True})


@router.get("/health/ready", responses={503: {"description": "no model loaded or answering"}})
async def server_ready(request: Request) -> Response:
    """200 when the model is loaded and answering, else 503."""
    inference: Inference | None = request.app.state.inference
    if inference is None:
        reason = f"no model is loaded: {request.app.state.load_error or 'still starting'}"
        return FastJSONResponse({"ready": False, "error": reason}, status_code=503)
    if not inference.alive():
        return FastJSONResponse({"ready": False, "error": "the model loop has stopped"}, status_code=503)
    return FastJSONResponse({"ready": True})


# ---- model ------------------------------------------------------------------------------------

def artifact_version(runtime: ModelRuntime) -> str:
    """The artifact's version as /model reports it (its creation time), else its checksum prefix."""
    return str(runtime.metadata.get("created") or runtime.sha256[:12])


def served_model(request: Request, model_name: str, version: str | None,
                 inference: Inference | None = None) -> Inference:
    """The inference of the model named in the path; 404 for another name or version."""
    inference = inference or current_inference(request)         # 503 while no model is loaded
    runtime = inference.runtime
    if model_name != runtime.name:
        raise V2Error(f"unknown model {model_name!r}; this server serves {runtime.name!r}", 404)
    if version is not None and version != artifact_version(runtime):
        raise V2Error(f"model {model_name!r} has no version {version!r}; it has {artifact_version(runtime)!r}", 404)
    return inference


def output_shape(spec: OutputSpec, runtime: ModelRuntime, n: int) -> list[int]:
    return {"n": [n], "nd": [n, runtime.latent_dim], "nchw": [n, *runtime.input_shape]}[spec.dims]


def model_metadata_body(runtime: ModelRuntime) -> dict[str, Any]:
    return {
        "name": runtime.name,
        "versions": [artifact_version(runtime)],
        "platform": PLATFORM,
        "inputs": [{"name": INPUT_NAME, "datatype": "FP32", "shape": [-1, *runtime.input_shape]}],
        "outputs": [{"name": name, "datatype": spec.datatype, "shape": output_shape(spec, runtime, -1)}
                    for name, spec in OUTPUTS.items()],
    }


@router.get("/models/{model_name}", responses=ERRORS)
@router.get("/models/{model_name}/versions/{model_version}", responses=ERRORS)
async def model_metadata(request: Request, model_name: str, model_version: str | None = None) -> Response:
    """Model metadata: name, versions, platform, and the input and output tensors."""
    inference = served_model(request, model_name, model_version)
    return FastJSONResponse(model_metadata_body(inference.runtime))


@router.get("/models/{model_name}/ready", responses=ERRORS)
@router.get("/models/{model_name}/versions/{model_version}/ready", responses=ERRORS)
async def model_ready(request: Request, model_name: str, model_version: str | None = None) -> Response:
    """200 when this model is ready for inference, else 503."""
    inference = served_model(request, model_name, model_version)
    ready = inference.alive()
    return FastJSONResponse({"name": model_name, "ready": ready}, status_code=200 if ready else 503)


# ---- infer ------------------------------------------------------------------------------------

@dataclass
class InferRequest:
    id: str | None
    images: np.ndarray                  # (N, C, H, W) float32 in [0, 1]
    outputs: list[str]
    fpr: float


INFER_BODY: dict[str, Any] = {
    "required": True,
    "content": {"application/json": {
        "schema": {"type": "object", "required": ["inputs"], "properties": {
            "id": {"type": "string"},
            "parameters": {"type": "object", "description": "fpr: false-positive rate of the threshold "
                                                            "behind is_anomaly (default VAE_DEFAULT_FPR)"},
            "inputs": {"type": "array", "items": {"type": "object"}},
            "outputs": {"type": "array", "items": {"type": "object"}}}},
        "example": {"id": "42", "inputs": [{"name": INPUT_NAME, "shape": [1, 1, 2, 2], "datatype": "FP32",
                                            "data": [0.0, 0.5, 1.0, 0.25]}],
                    "outputs": [{"name": "score"}, {"name": "is_anomaly"}]},
    }},
}


@router.post("/models/{model_name}/infer", responses=ERRORS, openapi_extra={"requestBody": INFER_BODY})
@router.post("/models/{model_name}/versions/{model_version}/infer", responses=ERRORS,
             openapi_extra={"requestBody": INFER_BODY})
async def infer(request: Request, model_name: str, settings: SettingsDep, metrics: MetricsDep,
                held: InferenceDep, model_version: str | None = None) -> Response:
    """Inference on JSON tensors: `images` in, the requested outputs (default score, p_value,
    is_anomaly) out, each as a flat row-major `data` list with its shape and datatype."""
    inference = served_model(request, model_name, model_version, held)
    runtime = inference.runtime
    if "inference-header-content-length" in request.headers:
        raise V2Error("the binary tensor data extension is not supported; send the tensors as JSON data")
    body = await request.body()
    started = time.perf_counter()
    parsed = await run_in_threadpool(parse_infer_request, body, runtime.input_shape,
                                     settings.max_images_per_request, settings.default_fpr)
    metrics.decode_seconds.observe(time.perf_counter() - started)
    # only is_anomaly needs the threshold: checked before the model runs, as the rest of the API does
    threshold = anomaly_threshold(runtime, parsed.fpr) if "is_anomaly" in parsed.outputs else None
    values = await compute_outputs(inference, parsed.images, parsed.outputs, threshold)
    response: dict[str, Any] = {"model_name": runtime.name, "model_version": artifact_version(runtime)}
    if parsed.id is not None:
        response["id"] = parsed.id
    for p_value in values["p_value"].tolist() if "p_value" in values else ():
        metrics.p_values.observe(p_value)
    if threshold is not None:
        metrics.anomalies.inc(int(values["is_anomaly"].sum()))
        response["parameters"] = {"fpr": parsed.fpr, "threshold": threshold, "score_kind": runtime.score_kind}
    response["outputs"] = [{"name": name, "datatype": OUTPUTS[name].datatype, "shape": list(values[name].shape),
                            "data": values[name].reshape(-1)} for name in parsed.outputs]
    return FastJSONResponse(response)


def anomaly_threshold(runtime: ModelRuntime, fpr: float) -> float:
    try:
        return runtime.threshold(fpr)
    except ValueError as error:         # an fpr too small for the calibration set
        raise V2Error(str(error)) from None


async def compute_outputs(inference: Inference, images: np.ndarray, names: list[str],
                          threshold: float | None) -> dict[str, np.ndarray]:
    """The outputs named (and their siblings): each model operation they need runs once, concurrently.
    is_anomaly is there when a threshold is given."""
    runtime = inference.runtime
    operations = sorted({OUTPUTS[name].operation for name in names})
    results = dict(zip(operations, await asyncio.gather(*(inference.run(op, images) for op in operations)),
                       strict=True))
    values: dict[str, np.ndarray] = {}
    if "score" in results:
        scores = results["score"][0].astype(np.float64)     # compared in float64, as /anomaly-score does
        values["score"] = results["score"][0].astype(np.float32)
        values["p_value"] = runtime.p_values(scores).astype(np.float64)
        if threshold is not None:
            values["is_anomaly"] = scores > threshold
    if "encode" in results:
        values["mu"], values["log_var"] = (np.asarray(a, dtype=np.float32) for a in results["encode"])
    if "reconstruct" in results:
        values["reconstruction"] = np.asarray(results["reconstruct"][0], dtype=np.float32)
    return values


# ---- parsing the request (off the event loop) ---------------------------------------------------

def parse_infer_request(body: bytes, input_shape: tuple[int, int, int], max_images: int,
                        default_fpr: float) -> InferRequest:
    """The infer request's id, images, output names and fpr; V2Error says what is wrong."""
    payload = load_json(body)
    if not isinstance(payload, dict):
        raise V2Error('the body must be a JSON object {"inputs": [...], "outputs": [...] (optional)}')
    request_id = payload.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise V2Error(f"id must be a string, got {type(request_id).__name__}")
    inputs = payload.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1:
        raise V2Error(f"inputs must be a list of exactly one tensor, {INPUT_NAME!r}")
    images = images_from_tensor(inputs[0], input_shape, max_images)
    return InferRequest(request_id, images, requested_outputs(payload.get("outputs")),
                        fpr_parameter(payload.get("parameters"), default_fpr))


def load_json(body: bytes) -> Any:
    if not body:
        raise V2Error("the request body is empty; expected a JSON inference request")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as error:
        try:    # NaN and Infinity are not JSON, but Python clients write them: say what is wrong
            return json.loads(body)
        except ValueError:
            raise V2Error(f"the body is not valid JSON: {error}") from None


def images_from_tensor(tensor: Any, input_shape: tuple[int, int, int], max_images: int) -> np.ndarray:
    """The `images` input tensor as (N, C, H, W) float32, after checking it against the model."""
    if not isinstance(tensor, dict):
        raise V2Error("each input must be an object with name, shape, datatype and data")
    if tensor.get("name") != INPUT_NAME:
        raise V2Error(f"unknown input {tensor.get('name')!r}; this model takes one input, {INPUT_NAME!r}")
    datatype = tensor.get("datatype")
    if datatype not in INPUT_DATATYPES:
        raise V2Error(f"input {INPUT_NAME!r} has datatype {datatype!r}; expected FP32 (or FP64)")
    shape = check_shape(tensor.get("shape"), input_shape, max_images)
    if "data" not in tensor:
        raise V2Error(f"input {INPUT_NAME!r} has no data (the binary data extension is not supported)")
    array = number_array(tensor["data"])
    if array.size != math.prod(shape):
        raise V2Error(f"input {INPUT_NAME!r} has {array.size} values in data; its shape {shape} "
                      f"needs {math.prod(shape)}")
    if array.ndim != 1 and list(array.shape) != shape:
        raise V2Error(f"input {INPUT_NAME!r} data is nested as {list(array.shape)}; nested data must "
                      f"match the shape {shape} (or send it flat, row-major)")
    if not np.isfinite(array).all():
        raise V2Error(f"input {INPUT_NAME!r} contains NaN or infinite values")
    if array.min() < 0 or array.max() > 1:
        raise V2Error(f"input {INPUT_NAME!r} has values in [{array.min():g}, {array.max():g}]; "
                      "pixels must lie in [0, 1]")
    return np.ascontiguousarray(array.reshape(shape), dtype=np.float32)


def check_shape(shape: Any, input_shape: tuple[int, int, int], max_images: int) -> list[int]:
    expected = f"[N, {', '.join(map(str, input_shape))}] with N >= 1"
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise V2Error(f"input {INPUT_NAME!r} needs a shape: a list of integers, {expected}")
    if len(shape) != 4 or tuple(shape[1:]) != input_shape or shape[0] < 1:
        raise V2Error(f"input {INPUT_NAME!r} has shape {shape}; this model takes {expected}")
    if shape[0] > max_images:
        raise V2Error(f"{shape[0]} images in one request; the limit is {max_images}", 413)
    return shape


def number_array(data: Any) -> np.ndarray:
    """`data` as an array of numbers, flat or nested; strings, nulls, booleans or ragged rows fail."""
    try:
        array = np.asarray(data)                # no dtype yet, so non-numbers stay recognisable
    except ValueError:
        raise V2Error(f"input {INPUT_NAME!r} data is ragged: nested lists of different lengths") from None
    if array.dtype.kind not in "iuf":
        raise V2Error(f"input {INPUT_NAME!r} data must hold only numbers")
    return array.astype(np.float64, copy=False)


def requested_outputs(outputs: Any) -> list[str]:
    """Names of the requested outputs, in request order, without repeats. None requested: the default
    three (not all, as the spec suggests: a reconstruction is as large as the input)."""
    if outputs is None:
        return list(DEFAULT_OUTPUTS)
    if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
        raise V2Error('outputs must be a list of objects {"name": ...}')
    names = list(dict.fromkeys(o.get("name") for o in outputs))
    unknown = [name for name in names if name not in OUTPUTS]
    if unknown:
        raise V2Error(f"unknown outputs {unknown}; this model offers {list(OUTPUTS)}")
    return names or list(DEFAULT_OUTPUTS)


def fpr_parameter(parameters: Any, default: float) -> float:
    """The request's `fpr` parameter (false-positive rate behind is_anomaly), else the default."""
    if parameters is None:
        return default
    if not isinstance(parameters, dict):
        raise V2Error("parameters must be an object")
    fpr = parameters.get("fpr", default)
    if isinstance(fpr, bool) or not isinstance(fpr, int | float) or not 0 < fpr < 1:
        raise V2Error(f"parameter fpr must be a number strictly between 0 and 1, got {fpr!r}")
    return float(fpr)
