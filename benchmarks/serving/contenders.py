"""The contenders: how each is prepared once, started on a port, and what it is sent.

Every server runs alone on the machine while it is measured; the harness starts and stops it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from service.settings import Settings

from . import envs
from .servers import Server, free_port

PROJECT_ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
SCORE_PATH = "/anomaly-score"
PEER_MAX_BATCH = 64          # the same cap as our VAE_MAX_BATCH_IMAGES default
PEER_BATCH_WAIT_MS = 1       # the same wait as our VAE_MAX_BATCH_WAIT_MS default
TORCHSERVE_WORKERS = 2       # the reference figure


@dataclass
class Setup:
    """What every contender needs to know about this run."""
    model: Path
    workdir: Path
    floor_bytes: int
    vae_env: dict[str, str]
    litserve_fast_queue: bool = False
    peer_torch_threads: int = 0          # naive and LitServe: 0 leaves torch's default


@dataclass
class Contender:
    """One server under test. `body` names the workload body it is sent (see workload.write_bodies)."""
    key: str
    label: str
    path: str
    body: str
    settings: str
    start: Callable[[Setup, Path], Server]
    batch_body: str | None = None           # a 64-image request it understands, if any
    batch_note: str = "n/a"
    ready_timeout_s: float = 120.0
    versions: dict[str, str] = field(default_factory=dict)
    skip_reason: str | None = None           # set when it could not be prepared
    metrics_path: str | None = None          # Prometheus text to scrape around each run
    prepare: Callable[[Setup], Path] | None = None   # once per run, before any start; its result goes to start
    prepared: Path = Path(".")


def _base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VAE_")}
    env["PYTHONPATH"] = str(PROJECT_ROOT)
    return env


def _peer_threads(setup: Setup) -> dict[str, str]:
    return {"BENCH_TORCH_THREADS": str(setup.peer_torch_threads)} if setup.peer_torch_threads else {}


def _threads_note(setup: Setup) -> str:
    return f"{setup.peer_torch_threads} torch thread(s)" if setup.peer_torch_threads else "torch's default threads"


def _log(setup: Setup, key: str) -> Path:
    return setup.workdir / f"{key}.log"


def start_ours(setup: Setup, _: Path) -> Server:
    port = free_port()
    env = _base_env() | setup.vae_env
    command = [sys.executable, "-m", "service", "--model", str(setup.model), "--host", "127.0.0.1", "--port", str(port)]
    return Server.start("ours", command, env, port, _log(setup, "ours"), PROJECT_ROOT)


def _uvicorn(app: str, port: int) -> list[str]:
    """One uvicorn worker with its defaults (the same loop and HTTP parser our service gets)."""
    return [sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
            "--no-access-log", "--log-level", "warning"]


def start_naive(setup: Setup, _: Path) -> Server:
    port = free_port()
    env = _base_env() | {"BENCH_MODEL": str(setup.model)} | _peer_threads(setup)
    command = _uvicorn("benchmarks.serving.naive_app:app", port)
    return Server.start("naive", command, env, port, _log(setup, "naive"), PROJECT_ROOT)


def start_floor(setup: Setup, _: Path) -> Server:
    port = free_port()
    env = _base_env() | {"BENCH_FLOOR_BYTES": str(setup.floor_bytes)}
    command = _uvicorn("benchmarks.serving.floor_app:app", port)
    return Server.start("http-floor", command, env, port, _log(setup, "http-floor"), PROJECT_ROOT)


def start_fast_floor(setup: Setup, _: Path) -> Server:
    """The HTTP floor again, on uvicorn's fast loop and parser (from LitServe's venv, which has them)."""
    port = free_port()
    env = _base_env() | {"BENCH_FLOOR_BYTES": str(setup.floor_bytes)}
    command = [str(envs.python_of("litserve")), *_uvicorn("benchmarks.serving.floor_app:app", port)[1:],
               "--loop", "uvloop", "--http", "httptools"]
    return Server.start("http-floor-uvloop", command, env, port, _log(setup, "http-floor-uvloop"), PROJECT_ROOT)


def start_litserve(setup: Setup, _: Path) -> Server:
    port = free_port()
    env = _base_env() | {"BENCH_MODEL": str(setup.model), "BENCH_PORT": str(port),
                         "BENCH_MAX_BATCH": str(PEER_MAX_BATCH), "BENCH_BATCH_TIMEOUT": str(PEER_BATCH_WAIT_MS / 1000),
                         "BENCH_FAST_QUEUE": "1" if setup.litserve_fast_queue else "0"} | _peer_threads(setup)
    env.pop("PYTHONPATH")
    command = [str(envs.python_of("litserve")), str(HERE / "litserve_app.py")]
    return Server.start("litserve", command, env, port, _log(setup, "litserve"), setup.workdir)


def prepare_torchserve(setup: Setup) -> Path:
    """The model archive (.mar) with our handler, in workdir/torchserve/store."""
    store = setup.workdir / "torchserve" / "store"
    store.mkdir(parents=True, exist_ok=True)
    archiver = envs.python_of("torchserve").parent / "torch-model-archiver"
    command = [str(archiver), "--model-name", "fashion", "--version", "1.0", "--serialized-file", str(setup.model),
               "--handler", str(HERE / "torchserve_handler.py"), "--export-path", str(store), "--force"]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"torch-model-archiver failed: {(done.stderr or done.stdout).strip()[-300:]}")
    return store


def _torchserve_config(setup: Setup, store: Path, port: int) -> Path:
    """config.properties: loopback only, no token auth, no model API, no metrics API or system
    metrics collector, 2 workers with batching."""
    model = {"fashion": {"1.0": {"defaultVersion": True, "marName": "fashion.mar",
                                 "minWorkers": TORCHSERVE_WORKERS, "maxWorkers": TORCHSERVE_WORKERS,
                                 "batchSize": PEER_MAX_BATCH, "maxBatchDelay": PEER_BATCH_WAIT_MS,
                                 "responseTimeout": 120}}}
    lines = {
        "inference_address": f"http://127.0.0.1:{port}",
        "management_address": f"http://127.0.0.1:{free_port()}",
        "metrics_address": f"http://127.0.0.1:{free_port()}",
        "grpc_inference_address": "127.0.0.1", "grpc_inference_port": str(free_port()),
        "grpc_management_address": "127.0.0.1", "grpc_management_port": str(free_port()),
        "disable_token_authorization": "true", "enable_model_api": "false",
        "enable_metrics_api": "false", "disable_system_metrics": "true",
        "default_workers_per_model": str(TORCHSERVE_WORKERS),
        "model_store": str(store), "load_models": "fashion=fashion.mar", "models": json.dumps(model),
        "python": str(envs.python_of("torchserve")),
    }
    path = store.parent / "config.properties"
    path.write_text("".join(f"{key}={value}\n" for key, value in lines.items()))
    return path


def start_torchserve(setup: Setup, store: Path) -> Server:
    port = free_port()
    home = store.parent
    tmp = home / "tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    config = _torchserve_config(setup, store, port)
    env = _base_env() | {"TMPDIR": str(tmp), "LOG_LOCATION": str(home / "logs"),
                         "METRICS_LOCATION": str(home / "logs"),
                         "PATH": f"{envs.python_of('torchserve').parent}:{os.environ.get('PATH', '')}"}
    env.pop("PYTHONPATH")
    command = [str(envs.python_of("torchserve").parent / "torchserve"), "--start", "--foreground",
               "--ts-config", str(config), "--model-store", str(store), "--models", "fashion=fashion.mar",
               "--disable-token-auth", "--ncs"]
    return Server.start("torchserve", command, env, port, _log(setup, "torchserve"), home)


def _project_versions() -> dict[str, str]:
    return envs.versions(Path(sys.executable), ["vae-service", "torch", "fastapi", "starlette", "uvicorn",
                                                 "uvloop", "httptools", "orjson", "pillow"])


def build(setup: Setup, install_log: Path) -> list[Contender]:
    """Every server contender, the peers prepared (venvs installed, archive built) or marked skipped."""
    project = _project_versions()
    vae_settings = " ".join(f"{k}={v}" for k, v in sorted(setup.vae_env.items()))
    workers = Settings(_env_file=None, **{k.removeprefix("VAE_").lower(): v for k, v in setup.vae_env.items()})
    workers_note = f"{workers.resolved_workers()} worker(s) x {workers.resolved_model_concurrency()} model thread(s)"
    vae_settings = (f"{vae_settings}, defaults otherwise ({workers_note})" if vae_settings
                    else f"default settings ({workers_note}: one worker per CPU)")
    stack = (f"uvicorn {project['uvicorn']} (loop/http auto: uvloop {project['uvloop']}, "
             f"httptools {project['httptools']})")
    ours = Contender("ours", "ours", SCORE_PATH, "one", f"`python -m service`, {vae_settings}; {stack}",
                     start_ours, batch_body="batch64", batch_note="multipart `files` x64",
                     versions={k: project[k] for k in ("vae-service", "torch", "fastapi", "uvicorn")},
                     metrics_path="/metrics")
    naive = Contender("naive", "naive FastAPI", SCORE_PATH, "one",
                      "benchmarks/serving/naive_app.py: Pillow + `module.score` in the async handler, no batching, "
                      f"jsonable_encoder + JSONResponse; {_threads_note(setup)}; 1 uvicorn worker; {stack}",
                      start_naive,
                      batch_note="n/a (one raw image per request)",
                      versions={k: project[k] for k in ("torch", "fastapi", "uvicorn")})
    floor = Contender("http-floor", "HTTP floor", SCORE_PATH, "one",
                      f"benchmarks/serving/floor_app.py: raw ASGI app, constant {setup.floor_bytes}-byte JSON; "
                      f"1 uvicorn worker; {stack}", start_floor, batch_note="n/a",
                      versions={"uvicorn": project["uvicorn"]})
    litserve = Contender("litserve", "LitServe", SCORE_PATH, "one-multipart",
                         f"LitAPI max_batch_size={PEER_MAX_BATCH}, batch_timeout={PEER_BATCH_WAIT_MS / 1000} s; "
                         f"accelerator=cpu, workers_per_device=1, fast_queue={setup.litserve_fast_queue}, "
                         f"{_threads_note(setup)}, "
                         "other LitServer defaults; PNG as a one-part multipart upload (LitServe parses other "
                         "bodies as JSON)", start_litserve,
                         batch_note="n/a (one request is one LitAPI input)")
    torchserve = Contender("torchserve", "TorchServe", "/predictions/fashion", "one",
                           f"{TORCHSERVE_WORKERS} workers x 1 torch thread, batchSize={PEER_MAX_BATCH}, "
                           f"maxBatchDelay={PEER_BATCH_WAIT_MS} ms; token auth, model API, metrics API and "
                           "system metrics off; loopback", start_torchserve,
                           batch_note="n/a (one request is one handler input)", ready_timeout_s=180.0,
                           prepare=prepare_torchserve)
    fast_floor = Contender("http-floor-uvloop", "HTTP floor, uvloop", SCORE_PATH, "one",
                           "the same floor_app.py under uvicorn --loop uvloop --http httptools in LitServe's venv: "
                           "the same stack as the floor above, measured again", start_fast_floor, batch_note="n/a")
    for peer in (litserve, torchserve):
        try:
            python = envs.ensure_venv(peer.key, install_log)
            peer.versions = envs.versions(python, envs.REPORTED[peer.key])
            if peer.prepare is not None:
                peer.prepared = peer.prepare(setup)
        except RuntimeError as error:
            peer.skip_reason = str(error)
    fast_floor.skip_reason = litserve.skip_reason and "needs LitServe's venv, which could not be made"
    fast_floor.versions = {k: v for k, v in litserve.versions.items() if k in ("uvicorn", "uvloop", "httptools")}
    return [ours, naive, litserve, torchserve, floor, fast_floor]
