"""The README says what the code does: its settings table is the Settings class, its commands exist."""

from __future__ import annotations

import re
from pathlib import Path

from service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def readme_settings() -> dict[str, tuple[str, str]]:
    rows = re.findall(r"^\| `(VAE_[A-Z_]+)` \| `([^`]*)` \| (.+?) \|$", README, flags=re.MULTILINE)
    return {name: (default, meaning) for name, default, meaning in rows}


def test_settings_table_lists_every_setting_with_its_default() -> None:
    documented = readme_settings()
    fields = Settings.model_fields
    assert set(documented) == {f"VAE_{name.upper()}" for name in fields}
    for name, field in fields.items():
        default, meaning = documented[f"VAE_{name.upper()}"]
        if name == "model_path":
            assert field.default_factory() == ROOT / default
        else:
            expected = str(field.default).lower() if isinstance(field.default, bool) else str(field.default)
            assert default == expected, name
        assert meaning == field.description


def test_the_two_commands_come_first_and_exist() -> None:
    first_block = README.split("```sh", 1)[1].split("```", 1)[0]
    assert re.findall(r"^make (\w+)", first_block, flags=re.MULTILINE) == ["run", "test"]
    makefile = (ROOT / "Makefile").read_text()
    for target in ("run", "test", "models", "bench", "lint"):
        assert re.search(rf"^{target}:", makefile, flags=re.MULTILINE), target
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_every_make_target_the_readme_names_exists() -> None:
    named = set(re.findall(r"`make ([a-z][a-z-]*)`", README))
    assert {"run", "test", "eval", "eval-ceiling", "eval-drift", "eval-spread"} <= named
    makefile = (ROOT / "Makefile").read_text()
    assert not [t for t in named if not re.search(rf"^{re.escape(t)}:", makefile, flags=re.MULTILINE)]


def test_every_contract_endpoint_is_shown() -> None:
    for path in ("/encode", "/decode", "/reconstruct", "/sample", "/anomaly-score", "/interpolate", "/model",
                 "/healthz", "/readyz", "/metrics"):
        assert f"localhost:8000{path}" in README or f"`GET {path}`" in README, path


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_relative_link_in_the_docs_resolves() -> None:
    """A link into the repository names a file that exists and, with #fragment, one of its headings."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.MULTILINE | re.DOTALL)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue                                    # http(s), mailto: not ours to check
            path, _, fragment = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.is_relative_to(ROOT):
                continue                                    # beside the repository (../shared): not in a clone
            if not linked.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif fragment and linked.suffix == ".md":
                headings = re.findall(r"^#+ (.+)$", linked.read_text(), flags=re.MULTILINE)
                if fragment not in {anchor(h) for h in headings}:
                    broken.append(f"{page.name}: {target} (no such heading)")
    assert len(pages) > 1 and not broken, broken
