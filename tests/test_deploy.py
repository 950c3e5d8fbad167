"""The deployment files (Dockerfile, .dockerignore, docker-compose.yml, deploy/) checked without a
container engine or a cluster: they parse, follow their schemas, refer only to files, settings,
routes and ports that exist, agree with each other, and the image's serving command (parsed from
the Dockerfile) really serves when run here with the project's venv.

Schemas, both offline:
- tests/data/compose-spec.json is the Compose Specification's JSON schema, schema/compose-spec.json
  of github.com/compose-spec/compose-spec (Apache-2.0), copied unchanged from the npm package
  dclint 3.1.0 (schemas/compose.schema.json); its licence and NOTICE are in compose-spec.LICENSE beside it.
- the Kubernetes API schemas come from the PyPI package kubernetes-validate (Apache-2.0), which ships
  them for each Kubernetes minor version.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import jsonschema
import pytest
import yaml

from service.app import create_app
from service.settings import Settings
from training.__main__ import build_parser as training_parser

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_SCHEMA = Path(__file__).parent / "data" / "compose-spec.json"
K8S_DIR = ROOT / "deploy" / "k8s"
K8S_VERSION = "1.30"                                    # the oldest Kubernetes the manifests target
PYTHON_IMAGE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"   # python:3.11-slim's PATH
SETTINGS_FIELDS = {f"VAE_{name.upper()}" for name in Settings.model_fields}


# ---- Dockerfile ---------------------------------------------------------------------------------

@dataclass
class Stage:
    name: str
    base: str
    parent: Stage | None                                # the earlier stage it is built FROM, if any
    instructions: list[tuple[str, str]] = field(default_factory=list)    # (KEYWORD, arguments)

    def own(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def chain(self) -> list[Stage]:
        """This stage and the stages it builds on, the root first."""
        return [*(self.parent.chain() if self.parent else []), self]

    def all(self, keyword: str) -> list[str]:
        return [args for stage in self.chain() for args in stage.own(keyword)]


def dockerfile_lines(text: str) -> Iterator[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction, with continuation lines joined and comments dropped."""
    logical = ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        logical += line.rstrip()
        if logical.endswith("\\"):
            logical = logical[:-1] + " "
            continue
        keyword, _, args = logical.strip().partition(" ")
        yield keyword.upper(), args.strip()
        logical = ""


def expand(text: str, env: dict[str, str]) -> str:
    """$VAR and ${VAR} (and ${VAR:-default}) from env, as Docker and Compose substitute them."""
    def value(match: re.Match[str]) -> str:
        name, default = match.group(1) or match.group(3), match.group(2)
        return env.get(name) or (default or "")
    return re.sub(r"\$\{(\w+)(?::?-([^}]*))?\}|\$(\w+)", value, text)


Parsed = tuple[dict[str, str], list[Stage]]          # global ARG defaults, stages in order


def parse_dockerfile() -> Parsed:
    """The global ARG defaults and the stages, in order."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for keyword, args in dockerfile_lines((ROOT / "Dockerfile").read_text()):
        if keyword == "FROM":
            base, _, name = expand(args, global_args).partition(" AS ")
            parent = next((s for s in stages if s.name == base.strip()), None)
            stages.append(Stage(name.strip(), base.strip(), parent))
        elif stages:
            stages[-1].instructions.append((keyword, args))
        elif keyword == "ARG":
            name, _, default = args.partition("=")
            global_args[name] = default
    return global_args, stages


def exec_form(args: str) -> list[str]:
    """A CMD/ENTRYPOINT/HEALTHCHECK CMD as argv: the JSON exec form, or the shell form via sh -c."""
    return json.loads(args) if args.startswith("[") else ["/bin/sh", "-c", args]


def image_command(stage: Stage) -> list[str]:
    """ENTRYPOINT + CMD of the image, as argv."""
    entrypoint = stage.all("ENTRYPOINT")
    return [*(exec_form(entrypoint[-1]) if entrypoint else []), *exec_form(stage.all("CMD")[-1])]


def env_of(stage: Stage) -> dict[str, str]:
    """The environment a container of this stage starts with: its ENVs over the base image's."""
    env = {"PATH": PYTHON_IMAGE_PATH}
    for args in stage.all("ENV"):
        tokens = shlex.split(args)
        pairs = [t.partition("=")[::2] for t in tokens] if "=" in tokens[0] else [(tokens[0], " ".join(tokens[1:]))]
        for name, value in pairs:
            env[name] = expand(value, env)
    return env


def copies(stage: Stage) -> list[tuple[list[str], str, str | None]]:
    """(sources, destination, --from stage or None) of every COPY and ADD in the stage's chain."""
    found = []
    for args in [*stage.all("COPY"), *stage.all("ADD")]:
        tokens = shlex.split(args)
        flags = {t.split("=", 1)[0]: t.partition("=")[2] for t in tokens if t.startswith("--")}
        paths = [t for t in tokens if not t.startswith("--")]
        found.append((paths[:-1], paths[-1], flags.get("--from")))
    return found


def image_file_sources(stage: Stage) -> dict[str, Path]:
    """Files the image gets from the build context: container path -> path in this repository."""
    files = {}
    for sources, destination, from_stage in copies(stage):
        if from_stage is None:
            for source in sources:
                target = PurePosixPath(destination) / PurePosixPath(source).name if destination.endswith("/") \
                    else PurePosixPath(destination)
                files[str(target)] = ROOT / source
    return files


def glob_regex(glob: str) -> str:
    """A .dockerignore pattern as a regex: `*` and `?` stay within one path segment, `**` spans any."""
    segments = re.split(r"\*\*/?", glob)
    return "(?:.*/)?".join("".join("[^/]*" if c == "*" else "[^/]" if c == "?" else re.escape(c) for c in segment)
                           for segment in segments)


def dockerignored(path: str) -> bool:
    """Whether .dockerignore keeps a context path out: the last pattern matching it or a parent wins."""
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    parts = PurePosixPath(path).parts
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    ignored = False
    for pattern in patterns:
        regex = glob_regex(pattern.removeprefix("!").strip("/"))
        if any(re.fullmatch(regex, candidate) for candidate in candidates):
            ignored = not pattern.startswith("!")
    return ignored


@pytest.fixture(scope="module")
def dockerfile() -> Parsed:
    return parse_dockerfile()


@pytest.fixture(scope="module")
def runtime_stage(dockerfile: Parsed) -> Stage:
    """The stage `docker build .` produces: the last one."""
    return dockerfile[1][-1]


def stage_named(dockerfile: Parsed, name: str) -> Stage:
    stages = {stage.name: stage for stage in dockerfile[1]}
    assert name in stages, f"the Dockerfile has no stage {name!r} (stages: {list(stages)})"
    return stages[name]


# ---- shared expectations ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def app_routes() -> set[str]:
    """Every path the app serves, from its OpenAPI document (building the app loads no model)."""
    return set(create_app(Settings(_env_file=None)).openapi()["paths"])


def check_service_env(env: dict[str, str]) -> Settings:
    """Every VAE_* name is a real setting and the values pass its validation; returns the settings."""
    unknown = {name for name in env if name.startswith("VAE_")} - SETTINGS_FIELDS
    assert not unknown, f"not fields of service.settings.Settings: {sorted(unknown)}"
    values = {name.removeprefix("VAE_").lower(): value for name, value in env.items() if name.startswith("VAE_")}
    return Settings(_env_file=None, **values)


def check_threads_fit(settings: Settings, cpus: float, where: str) -> None:
    assert settings.torch_threads >= 1, f"{where}: set VAE_TORCH_THREADS (automatic counts the host's cores)"
    assert settings.torch_threads * settings.workers <= max(1, cpus), \
        f"{where}: {settings.workers} workers x {settings.torch_threads} threads exceed the CPU limit {cpus}"


def check_training_command(argv: list[str]) -> Any:
    """A `python -m training train ...` command that the training CLI accepts; returns its options."""
    assert argv[:3] == ["python", "-m", "training"], f"not the training command: {argv}"
    return training_parser().parse_args(argv[3:])


def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


# ---- Dockerfile tests ---------------------------------------------------------------------------

def test_dockerfile_copies_only_existing_paths_that_reach_the_context(dockerfile: Parsed) -> None:
    stage_names = {stage.name for stage in dockerfile[1]}
    for stage in dockerfile[1]:
        for sources, _, from_stage in copies(stage):
            if from_stage is not None:
                assert from_stage in stage_names, f"COPY --from={from_stage}: no such stage"
                continue
            for source in sources:
                assert (ROOT / source).exists(), f"COPY {source}: no such file in the build context"
                assert not dockerignored(source), f"COPY {source}: .dockerignore keeps it out of the context"


def test_dockerignore_keeps_local_state_out() -> None:
    for path in (".venv/bin/python", ".git/HEAD", "service/__pycache__/app.cpython-311.pyc",
                 "models/digits.pt.ckpt", "models/digits-report/samples.png", "benchmarks/results/x.json",
                 ".pytest_cache/v", ".env"):
        assert dockerignored(path), f"{path} would be sent to the docker build"


def test_dockerfile_installs_cpu_torch_at_the_project_pin(dockerfile: Parsed) -> None:
    pin = next(d for d in pyproject()["project"]["dependencies"] if d.startswith("torch"))
    global_args, stages = dockerfile
    assert pin == f"torch=={global_args['TORCH_VERSION']}", "the Dockerfile's TORCH_VERSION differs from pyproject"
    torch_installs = [run for stage in stages for run in stage.own("RUN") if "torch==" in run]
    assert torch_installs and all("--index-url https://download.pytorch.org/whl/cpu" in run
                                  for run in torch_installs), "torch must come from the CPU index"


def test_runtime_image_is_slim_non_root_and_has_no_training_extras(dockerfile: Parsed,
                                                                  runtime_stage: Stage) -> None:
    assert runtime_stage.chain()[0].base == "python:3.11-slim"
    for stage in (runtime_stage, stage_named(dockerfile, "train")):
        user = stage.all("USER")[-1].split(":")[0]
        assert user not in ("root", "0"), f"the {stage.name} image must not run as root"
    venv_sources = [stage_named(dockerfile, f) for _, _, f in copies(runtime_stage) if f]
    assert venv_sources, "the runtime stage should copy its venv from a builder stage"
    for builder in venv_sources:
        assert not any("[train]" in run for run in builder.all("RUN")), "training extras in the API image"
    train = stage_named(dockerfile, "train")
    train_venvs = [stage_named(dockerfile, f) for _, _, f in copies(train) if f]
    assert any("[train]" in run for stage in train_venvs for run in stage.all("RUN"))


def test_runtime_environment_matches_the_settings(dockerfile: Parsed, runtime_stage: Stage) -> None:
    env = env_of(runtime_stage)
    settings = check_service_env(env)
    assert settings.host == "0.0.0.0", "in a container the API must listen on every interface"
    assert runtime_stage.all("EXPOSE") == [str(settings.port)], "EXPOSE must be the port VAE_PORT sets"
    baked = image_file_sources(runtime_stage)
    model = str(settings.model_path)
    assert model in baked and f"{model}.sha256" in baked, f"VAE_MODEL_PATH {model} is not a file the image has"
    venvs = [re.search(r"python -m venv (\S+)", run) for stage in dockerfile[1] for run in stage.own("RUN")]
    venv = next(m.group(1) for m in venvs if m)
    assert env["PATH"].split(":")[0] == f"{venv}/bin", "python in CMD must be the venv's"
    argv = image_command(runtime_stage)
    assert argv[:3] == ["python", "-m", "service"], f"the image must serve with `python -m service`, not {argv}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_answering(url: str, process: subprocess.Popen, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert process.poll() is None, "the serving command exited"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.1)
    raise AssertionError(f"{url} did not answer 200 within {seconds} s")


def compose_healthcheck_argv(test: list[str] | str) -> list[str]:
    if isinstance(test, str) or test[0] == "CMD-SHELL":
        return ["/bin/sh", "-c", test if isinstance(test, str) else test[1]]
    assert test[0] == "CMD", f"unexpected healthcheck form {test}"
    return test[1:]


def image_healthchecks(stage: Stage) -> list[list[str]]:
    """The Dockerfile's HEALTHCHECK command and compose's for the api, as argv."""
    return [exec_form(re.sub(r"^.*?\bCMD\s+", "", stage.all("HEALTHCHECK")[-1])),
            compose_healthcheck_argv(compose()["services"]["api"]["healthcheck"]["test"])]


@contextmanager
def container_command(stage: Stage, workdir: Path, model_path: Path) -> Iterator[dict[str, str]]:
    """Runs the image's command here with the image's environment; only host, port, model path and
    the venv are local (python resolves to this project's venv, as /opt/venv's would in the image).
    Yields that environment; stops the process on the way out."""
    argv, env = image_command(stage), env_of(stage)
    venv_bin = Path(sys.executable).parent
    env.update(VAE_HOST="127.0.0.1", VAE_PORT=str(free_port()), VAE_MODEL_PATH=str(model_path),
               PATH=f"{venv_bin}:{env['PATH']}", PYTHONPATH=str(ROOT), HOME=str(workdir))
    executable = shutil.which(argv[0], path=env["PATH"])
    assert executable and Path(executable).parent == venv_bin
    with (workdir / "server.log").open("w") as log:
        process = subprocess.Popen([executable, *argv[1:]], env=env, cwd=workdir, stdout=log,
                                   stderr=subprocess.STDOUT)
        try:
            wait_until_answering(f"http://127.0.0.1:{env['VAE_PORT']}/healthz", process, 30)
            yield env
        finally:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def run_check(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, env=env, cwd=env["HOME"], capture_output=True, text=True, timeout=15)


def test_container_command_serves_and_healthchecks_pass(runtime_stage: Stage, tmp_path: Path) -> None:
    """The image's command serves the model the image holds; the Dockerfile's and compose's health
    checks and the Kubernetes probes pass against it, and the health check fails once it is gone."""
    model = image_file_sources(runtime_stage)[env_of(runtime_stage)["VAE_MODEL_PATH"]]
    with container_command(runtime_stage, tmp_path, model) as env:
        base = f"http://127.0.0.1:{env['VAE_PORT']}"
        with urllib.request.urlopen(f"{base}/readyz", timeout=5) as answer:
            assert answer.status == 200
        for check in image_healthchecks(runtime_stage):
            result = run_check(check, env)
            assert result.returncode == 0, f"health check {check} failed: {result.stderr}"
        for probe in k8s_probes():
            with urllib.request.urlopen(f"{base}{probe['httpGet']['path']}", timeout=5) as answer:
                assert answer.status == 200
    assert run_check(image_healthchecks(runtime_stage)[0], env).returncode != 0, "passes with no server"


def test_healthcheck_fails_while_no_model_is_served(runtime_stage: Stage, tmp_path: Path) -> None:
    """Without its model the process lives (/healthz 200) but is not ready: the health checks say so."""
    with container_command(runtime_stage, tmp_path, tmp_path / "missing.pt") as env:
        for check in image_healthchecks(runtime_stage):
            result = run_check(check, env)
            assert result.returncode != 0 and "503" in result.stderr, f"{check} passed without a model"


# ---- docker-compose.yml -------------------------------------------------------------------------

def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def interpolated(value: Any, env: dict[str, str] | None = None) -> Any:
    """The compose value with ${VAR:-default} substituted as compose does (no variables set: defaults)."""
    if isinstance(value, str):
        return expand(value.replace("$$", "\0"), env or {}).replace("\0", "$")
    if isinstance(value, list):
        return [interpolated(v, env) for v in value]
    if isinstance(value, dict):
        return {k: interpolated(v, env) for k, v in value.items()}
    return value


def service_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {name: str(value) for name, value in env.items()}


def volume_mounts(service: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """target -> (source, read-only) for the short volume syntax."""
    mounts = {}
    for spec in service.get("volumes", []):
        source, target, *options = spec.split(":")
        mounts[target] = (source, "ro" in (options[0].split(",") if options else []))
    return mounts


def test_compose_file_follows_the_compose_specification() -> None:
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    errors = [f"{'/'.join(map(str, e.path))}: {e.message}"
              for e in jsonschema.Draft7Validator(schema).iter_errors(compose())]
    assert not errors, "\n".join(errors)


def test_compose_schema_catches_mistakes() -> None:
    broken = compose()
    broken["services"]["api"]["helthcheck"] = broken["services"]["api"].pop("healthcheck")
    validator = jsonschema.Draft7Validator(json.loads(COMPOSE_SCHEMA.read_text()))
    assert any("helthcheck" in e.message for e in validator.iter_errors(broken))


def test_compose_api_scales_and_matches_the_settings(dockerfile: Parsed, app_routes: set[str]) -> None:
    api = interpolated(compose()["services"]["api"])
    assert "ports" not in api and "container_name" not in api, "replicas of api would clash (--scale)"
    stage_named(dockerfile, api["build"]["target"])
    settings = check_service_env(service_env(api))
    assert settings.host == "0.0.0.0"
    assert [str(p) for p in api["expose"]] == [str(settings.port)]
    check_threads_fit(settings, float(api["deploy"]["resources"]["limits"]["cpus"]), "compose api")
    assert api["restart"] == "unless-stopped"
    assert "/readyz" in app_routes and "/readyz" in " ".join(api["healthcheck"]["test"])


def test_compose_models_volume_serves_the_default_model_without_training(dockerfile: Parsed,
                                                                         runtime_stage: Stage) -> None:
    """The API reads its model from the named volume; a new volume is a copy of the image's folder at
    its mount point, so that folder must hold the default model (and the volume must be named)."""
    services = interpolated(compose()["services"])
    assert "models" in compose()["volumes"]
    model = PurePosixPath(service_env(services["api"])["VAE_MODEL_PATH"])
    source, read_only = volume_mounts(services["api"])[str(model.parent)]
    assert source == "models" and read_only, "the api should mount the models volume read-only"
    for stage in (runtime_stage, stage_named(dockerfile, "train")):
        baked = image_file_sources(stage)
        assert str(model) in baked and f"{model}.sha256" in baked, f"{stage.name} image lacks the default model"
    train_source, train_read_only = volume_mounts(services["train"])[str(model.parent)]
    assert train_source == "models" and not train_read_only


def test_compose_train_is_a_valid_one_shot_training_into_the_volume(dockerfile: Parsed) -> None:
    services = interpolated(compose()["services"])
    train = services["train"]
    assert train["profiles"] == ["train"] and train["restart"] == "no"
    stage_named(dockerfile, train["build"]["target"])
    options = check_training_command(train["command"])
    assert options.out == service_env(services["api"])["VAE_MODEL_PATH"], "train writes what api serves"
    renamed = interpolated(compose()["services"], {"MODEL_NAME": "shirts"})
    assert check_training_command(renamed["train"]["command"]).out == "/models/shirts.pt"
    assert service_env(renamed["api"])["VAE_MODEL_PATH"] == "/models/shirts.pt"


def nginx_config() -> str:
    text = (ROOT / "deploy" / "nginx.conf").read_text()
    return "\n".join(line.split("#")[0] for line in text.splitlines())


def nginx_directive(config: str, name: str) -> list[str]:
    return [m.group(1).strip() for m in re.finditer(rf"^\s*{name}\s+([^;]+);", config, re.MULTILINE)]


def test_load_balancer_publishes_the_port_and_reaches_every_api_replica(app_routes: set[str]) -> None:
    services = interpolated(compose()["services"])
    lb, api_env = services["lb"], service_env(services["api"])
    config = nginx_config()
    published = [p.rsplit(":", 1) for p in lb["ports"]]
    assert published == [["8000", nginx_directive(config, "listen")[0]]]
    mounts = volume_mounts(lb)
    assert mounts["/etc/nginx/conf.d/default.conf"][0] == "./deploy/nginx.conf"
    # re-resolved per request through Docker's DNS, so replicas added by --scale get traffic too
    assert nginx_directive(config, "resolver")[0].split()[0] == "127.0.0.11"
    variable, target = nginx_directive(config, "set")[0].split()
    assert nginx_directive(config, "proxy_pass") == [variable]
    assert target == f"http://api:{api_env['VAE_PORT']}"
    body_limit = nginx_directive(config, "client_max_body_size")[0]
    assert int(body_limit.rstrip("m")) * 1024 * 1024 >= check_service_env(api_env).max_body_bytes
    assert lb["depends_on"]["api"]["condition"] == "service_healthy"
    assert "/readyz" in app_routes and "http://127.0.0.1:8000/readyz" in lb["healthcheck"]["test"]


# ---- Kubernetes ---------------------------------------------------------------------------------

def k8s_documents() -> list[tuple[str, dict[str, Any]]]:
    return [(path.name, doc) for path in sorted(K8S_DIR.glob("*.yaml")) if path.name != "kustomization.yaml"
            for doc in yaml.safe_load_all(path.read_text()) if doc]


def k8s_kind(kind: str) -> dict[str, Any]:
    found = [doc for _, doc in k8s_documents() if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind} in deploy/k8s, found {len(found)}"
    return found[0]


def k8s_probes() -> list[dict[str, Any]]:
    container = k8s_kind("Deployment")["spec"]["template"]["spec"]["containers"][0]
    return [container[p] for p in ("startupProbe", "readinessProbe", "livenessProbe") if p in container]


def cpu_count(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


@pytest.mark.parametrize("document", [doc for _, doc in k8s_documents()],
                         ids=[f"{name}:{doc['kind']}" for name, doc in k8s_documents()])
def test_k8s_manifest_follows_the_kubernetes_schema(document: dict[str, Any]) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    kubernetes_validate.validate(document, K8S_VERSION, strict=True)


def test_k8s_schema_catches_mistakes() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    broken = k8s_kind("Deployment")
    container = broken["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_k8s_deployment_matches_the_service_and_the_image(runtime_stage: Stage, app_routes: set[str]) -> None:
    pod = k8s_kind("Deployment")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    settings = check_service_env({item["name"]: item["value"] for item in container["env"]})
    assert settings.host == "0.0.0.0"
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert list(ports.values()) == [settings.port]
    probes = {name: container[name]["httpGet"] for name in ("readinessProbe", "livenessProbe")}
    assert probes["readinessProbe"]["path"] == "/readyz" and probes["livenessProbe"]["path"] == "/healthz"
    for probe in k8s_probes():
        assert probe["httpGet"]["path"] in app_routes
        assert ports.get(probe["httpGet"]["port"], probe["httpGet"]["port"]) == settings.port
    resources = container["resources"]
    assert {"cpu", "memory"} <= resources["requests"].keys() and {"cpu", "memory"} <= resources["limits"].keys()
    check_threads_fit(settings, cpu_count(resources["limits"]["cpu"]), "k8s Deployment")
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert str(pod["securityContext"]["runAsUser"]) == runtime_stage.all("USER")[-1].split(":")[0]
    assert str(settings.model_path) in image_file_sources(runtime_stage), "VAE_MODEL_PATH is not in the image"
    assert container["image"] == interpolated(compose()["services"]["api"]["image"])


def test_k8s_service_and_autoscaler_target_the_deployment() -> None:
    deployment, service, hpa = k8s_kind("Deployment"), k8s_kind("Service"), k8s_kind("HorizontalPodAutoscaler")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    port_names = {port["name"] for port in container["ports"]} | {port["containerPort"] for port in container["ports"]}
    assert all(port["targetPort"] in port_names for port in service["spec"]["ports"])
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert hpa["apiVersion"] == "autoscaling/v2" and hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    assert "cpu" in container["resources"]["requests"], "CPU utilisation is measured against the request"
    assert "replicas" not in deployment["spec"], "the autoscaler owns the replica count"
    kustomization = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())
    assert all((K8S_DIR / resource).is_file() for resource in kustomization["resources"])


def test_k8s_training_job_writes_into_its_claim() -> None:
    job, claim = k8s_kind("Job"), k8s_kind("PersistentVolumeClaim")
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    options = check_training_command(container["command"])
    volumes = {v["name"]: v for v in pod["volumes"]}
    out_dir = PurePosixPath(options.out).parent
    mount = next(m for m in container["volumeMounts"] if PurePosixPath(m["mountPath"]) == out_dir)
    assert volumes[mount["name"]]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert not mount.get("readOnly", False)
    assert pod["restartPolicy"] in ("Never", "OnFailure") and pod["securityContext"]["fsGroup"]
    assert 1 <= options.threads <= cpu_count(container["resources"]["limits"]["cpu"])
    assert container["image"] == interpolated(compose()["services"]["train"]["image"])
