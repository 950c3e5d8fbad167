"""The peers' virtual environments, made by the benchmark itself under benchmarks/serving/.venvs/
(git-ignored). torch is always pinned to the project's 2.13.0, the CPU build this disk holds: an
unpinned torch would pull a multi-GB CUDA build."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

VENVS_DIR = Path(__file__).resolve().parent / ".venvs"
TORCH = "torch==2.13.0"
REQUIREMENTS: dict[str, list[str]] = {
    # LitServe parses uploads with Starlette's form parser, which needs python-multipart
    "litserve": ["litserve==0.2.19", TORCH, "python-multipart", "pillow", "numpy"],
    # TorchServe's Python worker imports yaml but does not declare it
    "torchserve": ["torchserve==0.12.0", "torch-model-archiver==0.12.0", TORCH, "pyyaml", "pillow", "numpy"],
}
# the distributions whose versions the report names, per venv
REPORTED = {
    "litserve": ["litserve", "torch", "fastapi", "uvicorn", "uvloop", "httptools", "pyzmq"],
    "torchserve": ["torchserve", "torch-model-archiver", "torch"],
}


def python_of(name: str) -> Path:
    return VENVS_DIR / name / "bin" / "python"


def ensure_venv(name: str, log_path: Path) -> Path:
    """The venv's python, created and filled on first use (a marker records what was installed).
    Raises RuntimeError, naming the log, when it cannot be made."""
    requirements = REQUIREMENTS[name]
    venv = VENVS_DIR / name
    marker = venv / ".bench-installed"
    if marker.exists() and json.loads(marker.read_text()) == requirements:
        return python_of(name)
    print(f"  installing {name} into {venv} ({' '.join(requirements)}); log {log_path}", flush=True)
    with open(log_path, "ab") as log:
        steps = [[sys.executable, "-m", "venv", str(venv)],
                 [str(python_of(name)), "-m", "pip", "install", "--quiet", *requirements]]
        for step in steps:
            if subprocess.run(step, stdout=log, stderr=subprocess.STDOUT, check=False).returncode != 0:
                raise RuntimeError(f"installing {name} failed at `{' '.join(step[:4])} …`; see {log_path}")
    marker.write_text(json.dumps(requirements))
    return python_of(name)


def versions(python: Path, distributions: list[str]) -> dict[str, str]:
    """Installed versions of the named distributions in the interpreter's environment."""
    code = ("import importlib.metadata as m, json, sys\n"
            "out = {}\n"
            "for d in sys.argv[1:]:\n"
            "    try: out[d] = m.version(d)\n"
            "    except m.PackageNotFoundError: out[d] = 'absent'\n"
            "print(json.dumps(out))")
    done = subprocess.run([str(python), "-c", code, *distributions], capture_output=True, text=True, check=False)
    return json.loads(done.stdout) if done.returncode == 0 else dict.fromkeys(distributions, "?")
