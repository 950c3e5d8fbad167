"""The report folder beside an artifact: plots, the calibration histogram, and an index.html that
links them all; rewritten for an existing artifact by `python -m training report`."""

from __future__ import annotations

import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageChops

from service.runtime import ModelRuntime
from tests.conftest import quick_config
from training import plots
from training.__main__ import main
from training.report import conformal_threshold, report_dir
from training.train import train

EXPECTED_HEADINGS = ["Summary", "Training losses", "Reconstructions", "Samples", "Latent space",
                     "Decoded manifold", "Calibration scores"]
VOID_TAGS = {"meta", "img", "br", "link", "input", "hr"}


class PageReader(HTMLParser):
    """Headings, image links, table headers, and whether every opened element was closed in order."""

    def __init__(self) -> None:
        super().__init__()
        self.open: list[str] = []
        self.mismatched: list[str] = []
        self.headings: list[str] = []
        self.table_headers: list[str] = []
        self.images: list[str] = []
        self._text_of: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img":
            self.images.append(dict(attrs)["src"] or "")
        if tag not in VOID_TAGS:
            self.open.append(tag)
        self._text_of = tag if tag in ("h2", "th") else None

    def handle_endtag(self, tag: str) -> None:
        if not self.open or self.open.pop() != tag:
            self.mismatched.append(tag)
        self._text_of = None

    def handle_data(self, data: str) -> None:
        if self._text_of == "h2":
            self.headings.append(data.strip())
        elif self._text_of == "th":
            self.table_headers.append(data.strip())


def read_page(path: Path) -> PageReader:
    reader = PageReader()
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<!doctype html>")
    reader.feed(text)
    assert not reader.open and not reader.mismatched, (reader.open, reader.mismatched)
    return reader


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A few epochs on digits with the report on: the artifact's path."""
    out = tmp_path_factory.mktemp("report")
    train(quick_config(out, report=True))
    return out / "model.pt"


def test_training_writes_an_index_that_shows_every_plot(trained: Path) -> None:
    folder = report_dir(trained)
    page = read_page(folder / "index.html")
    assert page.headings == EXPECTED_HEADINGS
    assert {"data", "architecture", "epochs", "best epoch", "test -ELBO", "score kind", "threshold at 1% FPR",
            "calibration size"} <= set(page.table_headers)
    assert len(page.images) == len(EXPECTED_HEADINGS) - 1
    for src in page.images:
        assert "/" not in src, "links must be relative to the folder"
        with Image.open(folder / src) as image:
            image.verify()
    assert sorted(p.name for p in folder.glob("*.png")) == sorted(page.images)


def test_the_report_command_rewrites_the_same_report_from_the_artifact(trained: Path, tmp_path: Path) -> None:
    original = report_dir(trained)
    copy = tmp_path / "copy.pt"
    shutil.copyfile(trained, copy)
    (tmp_path / "copy.pt.sha256").write_text(Path(f"{trained}.sha256").read_text().replace("model.pt", "copy.pt"))
    assert main(["report", str(copy)]) == 0
    rebuilt = report_dir(copy)
    assert read_page(rebuilt / "index.html").headings == EXPECTED_HEADINGS
    for name in ("reconstructions.png", "samples.png", "latent_space.png", "manifold.png", "calibration.png"):
        with Image.open(original / name) as a, Image.open(rebuilt / name) as b:
            assert ImageChops.difference(a.convert("RGB"), b.convert("RGB")).getbbox() is None, name


def test_the_report_command_names_a_missing_artifact(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(tmp_path / "nothing.pt")]) == 2
    assert "nothing.pt" in capsys.readouterr().err


@pytest.mark.parametrize("n", [99, 270, 1000])
def test_the_report_threshold_is_the_services(n: int) -> None:
    scores = np.random.default_rng(n).gamma(5.0, 5.0, n)
    runtime = ModelRuntime(None, {}, Path("unused.pt"), "", np.sort(scores))
    probes = np.concatenate([scores, scores + 1e-9, np.linspace(scores.min() - 1, scores.max() + 1, 500)])
    for fpr in (1 / (n + 1), 0.01, 0.05, 0.1):
        threshold = conformal_threshold(scores, fpr)
        assert threshold == runtime.threshold(fpr)
        assert np.array_equal(probes > threshold, runtime.p_values(probes) <= fpr)


def test_too_few_calibration_scores_give_no_threshold_and_still_a_histogram(tmp_path: Path) -> None:
    scores = np.arange(20.0)
    assert conformal_threshold(scores, 0.01) is None
    path = plots.plot_calibration(scores, None, 0.01, "elbo score, nats per image", tmp_path / "calibration.png")
    with Image.open(path) as image:
        image.verify()
