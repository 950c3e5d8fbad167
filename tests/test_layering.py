"""The service never imports training: everything model-specific travels inside the artifact."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_service_does_not_import_training_or_training_only_libraries() -> None:
    for path in (ROOT / "service").rglob("*.py"):
        top_levels = {name.split(".")[0] for name in imported_modules(path)}
        assert not top_levels & {"training", "sklearn", "skimage", "matplotlib", "tqdm", "benchmarks"}, path
