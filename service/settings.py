"""All service configuration in one class, read from VAE_* environment variables (or a .env file)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Self

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def default_model() -> Path:
    """models/digits.pt of the source tree this package runs from; when the package is installed
    elsewhere (site-packages), models/digits.pt under the working directory."""
    beside_package = Path(__file__).resolve().parents[1] / "models" / "digits.pt"
    return beside_package if beside_package.exists() else Path.cwd() / "models" / "digits.pt"


def available_cpus(cgroup_cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """The CPUs this process may use: its affinity mask, capped by a cgroup v2 quota (a container's
    CPU limit), which os.cpu_count() does not see."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = cgroup_cpu_max.read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cpus


def comma_or_json_list(value: Any) -> Any:
    """`a,b` or `["a", "b"]` from the environment, as a list; lists pass through."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                return json.loads(text)
            except ValueError:
                raise ValueError("not a valid JSON list") from None     # the error must not quote the text
        return [item.strip() for item in text.split(",") if item.strip()]
    return value


API_KEY_CHARACTERS = re.compile(r"^[\x21-\x7e]{16,256}$")     # printable ASCII, no spaces
MiB = 1024 * 1024


class Settings(BaseSettings):
    # hide_input_in_errors: a malformed VAE_API_KEYS must not print the keys in its error
    model_config = SettingsConfigDict(env_prefix="VAE_", env_file=".env", env_ignore_empty=True, extra="ignore",
                                      hide_input_in_errors=True)

    # ---- model --------------------------------------------------------------------------------
    model_path: Path = Field(default_factory=default_model, description="the artifact to serve")
    verify_checksum: bool = Field(True, description="refuse an artifact whose sha256 sidecar differs or is missing")

    # ---- server -------------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="interface to listen on (0.0.0.0 in a container)")
    port: int = Field(8000, ge=1, le=65535, description="port to listen on")
    workers: int = Field(0, ge=0, description="server processes, each with its own copy of the model (0: "
                                              "available CPUs / torch threads, a container's CPU limit "
                                              "included)")
    torch_threads: int = Field(1, ge=1, description="torch threads inside one model call (small images gain "
                                                   "nothing from more)")
    model_concurrency: int = Field(0, ge=0, description="batches the model runs at once, each on its own thread "
                                                       "(0: available CPUs / (workers x torch threads), at "
                                                       "least 1)")
    log_level: str = Field("info", pattern="^(critical|error|warning|info|debug)$",
                           description="critical, error, warning, info (one JSON access line per request) or debug")

    # ---- batching -----------------------------------------------------------------------------
    max_batch_images: int = Field(64, ge=1, description="a batch is cut at this many images ...")
    max_batch_wait_ms: float = Field(0.0, ge=0, description="... or after this wait, whichever comes first (0: "
                                                           "take what is queued; batches grow while the model "
                                                           "is busy)")
    inline_model_ms: float = Field(5.0, ge=0, description="a lone one-image request, the model idle, runs on the "
                                                         "event loop rather than a model thread while such a call "
                                                         "takes under this (0: always a model thread)")
    max_queue_wait_s: float = Field(2.0, gt=0, description="a request that would wait longer for the model "
                                                         "is refused at once with 503 and Retry-After")

    reuse_port: bool = Field(True, description="with several workers, give each its own listening socket "
                                               "(SO_REUSEPORT) and the kernel spreads connections evenly over "
                                               "them; false: all of them accept from one shared socket, and "
                                               "whichever worker wakes first takes a burst of connections")
    fast_lane: bool = Field(True, description="answer one raw image POSTed to /anomaly-score (no query but "
                                              "fpr) on a lean path beside FastAPI: the same answer for about a "
                                              "third less CPU")
    # ---- limits -------------------------------------------------------------------------------
    max_body_bytes: int = Field(16 * MiB, ge=1024, description="request body limit (413 past it)")
    max_images_per_request: int = Field(256, ge=1, description="images in one request (413 past it)")
    max_image_pixels: int = Field(16_000_000, ge=64, description="pixels of one decoded image, checked "
                                                               "before decoding (413 past it)")
    max_sample_n: int = Field(1024, ge=1, description="largest n for /sample (422 past it)")
    max_interpolate_steps: int = Field(256, ge=2, description="largest steps for /interpolate (422 past it)")
    default_fpr: float = Field(0.01, gt=0, lt=1, description="false-positive rate of the default threshold")
    max_queued_images: int = Field(4096, ge=1, description="images waiting for the model, per operation; past "
                                                         "it 503 with Retry-After at once (bounds memory)")
    max_requests_in_flight: int = Field(512, ge=1, description="requests handled at once (probes and /metrics "
                                                              "aside); past it 503 with Retry-After before the "
                                                              "body is read")
    model_timeout_s: float = Field(30.0, gt=0, description="a request still waiting for the model after this "
                                                         "long gets 503 with Retry-After instead of a late answer")

    # ---- access -------------------------------------------------------------------------------
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        [], description="API keys, comma-separated or a JSON list (several, for rotation); empty: no "
                        "authentication")
    public_metrics: bool = Field(True, description="/metrics answers without a key (scrapers rarely hold one; "
                                                   "it carries no request content)")
    admin_without_keys: bool = Field(False, description="allow POST /admin/reload with no API keys set (only "
                                                        "on a trusted network)")
    models_dir: Path | None = Field(None, description="where POST /admin/reload may load artifacts from "
                                                      "(default: the directory of VAE_MODEL_PATH)")
    cors_origins: Annotated[list[str], NoDecode] = Field(
        [], description="origins allowed to call the API from a browser, comma-separated (empty: no CORS)")

    @field_validator("api_keys", "cors_origins", mode="before")
    @classmethod
    def _split_list(cls, value: Any) -> Any:
        return comma_or_json_list(value)

    @field_validator("api_keys")
    @classmethod
    def _strong_keys(cls, keys: list[SecretStr]) -> list[SecretStr]:
        # the message never quotes a key: settings errors end up in logs
        for index, key in enumerate(keys):
            if not API_KEY_CHARACTERS.match(key.get_secret_value()):
                raise ValueError(f"API key {index} must be 16 to 256 printable ASCII characters without spaces "
                                 "or commas")
            if "," in key.get_secret_value():
                raise ValueError(f"API key {index} must not contain a comma")
        return keys

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.max_batch_images > 4096:
            raise ValueError("VAE_MAX_BATCH_IMAGES above 4096 would hold gigabytes per batch")
        return self

    def resolved_model_concurrency(self) -> int:
        """workers x concurrency x torch threads <= available CPUs by default: busy, never oversubscribed."""
        if self.model_concurrency:
            return self.model_concurrency
        return max(1, available_cpus() // (self.resolved_workers() * self.torch_threads))

    def resolved_workers(self) -> int:
        """One process per torch thread's worth of CPU by default: a Python process saturates one
        core on its event loop well before its model does (benchmarks/serving)."""
        return self.workers or max(1, available_cpus() // self.torch_threads)
