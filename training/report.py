"""The training report beside an artifact: `<stem>-report/` with the plots and an index.html that
shows them under headings, after a summary table. Written at the end of training, or again for
an existing artifact by `python -m training report ARTIFACT` (no retraining: the artifact carries
its config, history and calibration scores, and the data split is rebuilt from the config)."""

from __future__ import annotations

import html
import math
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import Any

import numpy as np
import torch

from . import plots
from .data import Splits
from .export import artifact_splits, load_artifact

REPORT_FPR = 0.01           # the service's default false-positive rate (VAE_DEFAULT_FPR)
PLOTTED_TEST_IMAGES = 2000  # the latent-space plot's cap, to keep it readable and quick


@dataclass(frozen=True)
class Section:
    file: str
    heading: str
    caption: str


# in the order index.html shows them; a section whose file was not written is left out
SECTIONS = (
    Section("loss_curves.png", "Training losses",
            "Reconstruction error, KL and their sum (-ELBO) per epoch: train solid, validation dashed."),
    Section("reconstructions.png", "Reconstructions",
            "Held-out test images (top row) and the model's reconstructions at z = mu (bottom row)."),
    Section("samples.png", "Samples", "Images decoded from 40 draws of z from the prior N(0, I), seed 0."),
    Section("latent_space.png", "Latent space",
            "Latent means of held-out test images, coloured by label (the first two principal components "
            "when the latent space has more than two dimensions)."),
    Section("manifold.png", "Decoded manifold",
            "Images decoded on a grid of z over the prior's 5% to 95% quantiles (two-dimensional latents only)."),
    Section("calibration.png", "Calibration scores",
            "Anomaly scores of the held-out normal calibration images, from which the service derives its "
            "p-values, with the threshold it flags above at a 1% false-positive rate."),
)


def report_dir(out: Path) -> Path:
    return out.with_name(out.stem + "-report")


def machine() -> str:
    """The CPU model, cores, memory, kernel and Python of this machine, for reports whose figures
    depend on it: timings, and trainings whose floating-point arithmetic adds up differently on
    another CPU."""
    model = "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.exists() else []:
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{model}, {os.cpu_count()} cores, {memory:.0f} GiB, Linux {platform.release()}, "
            f"Python {platform.python_version()}")


def training_machine() -> str:
    """`machine()` and the torch version: what a training's figures depend on."""
    return f"{machine()}, torch {torch.__version__}"


def conformal_threshold(scores: np.ndarray, fpr: float) -> float | None:
    """The service's rule (service/runtime.py, restated: training never imports the service): the
    calibration score such that `score > threshold` exactly when the conformal p-value
    (1 + #{calibration >= score}) / (n + 1) is <= fpr. None when fpr < 1 / (n + 1): no p-value
    falls that low, so no threshold can promise the rate."""
    ordered = np.sort(np.asarray(scores, dtype=np.float64))
    n = len(ordered)
    if n == 0 or fpr < 1 / (n + 1):
        return None
    return float(ordered[n - math.floor(fpr * (n + 1))])


# ---- plots -------------------------------------------------------------------------------------

@torch.no_grad()
def write_plots(model: torch.nn.Module, splits: Splits, history: list[dict[str, float]],
                folder: Path) -> list[Path]:
    """The model's pictures. `model` is a ServableVAE or its scripted artifact: both have encode,
    decode and forward (the reconstruction)."""
    test = splits.test
    x = torch.as_tensor(test.images[:PLOTTED_TEST_IMAGES])
    mu, _ = model.encode(x)
    prior_z = torch.randn(40, mu.shape[1], generator=torch.Generator().manual_seed(0))
    written = [
        plots.plot_losses(history, folder / "loss_curves.png"),
        plots.plot_reconstructions(x[:10].numpy(), model(x[:10]).numpy(), folder / "reconstructions.png"),
        plots.plot_grid(model.decode(prior_z).numpy(), 10, "samples from the prior", folder / "samples.png"),
        plots.plot_latent(mu.numpy(), None if test.labels is None else test.labels[:PLOTTED_TEST_IMAGES],
                          test.class_names, folder / "latent_space.png"),
    ]
    if mu.shape[1] == 2:
        written.append(plots.plot_manifold(model.decode, folder / "manifold.png"))
    return written


def write_report(model: torch.nn.Module, metadata: dict[str, Any], splits: Splits, artifact: Path) -> list[Path]:
    """Every plot, the calibration histogram and index.html in the artifact's report folder, from
    its exported metadata."""
    folder = report_dir(artifact)
    written = write_plots(model, splits, metadata["history"], folder)
    calibration = metadata["calibration"]
    scores = np.asarray(calibration["scores"])
    score_name = f"{calibration['score_kind']} score, {metadata.get('score', {}).get('units', 'nats per image')}"
    written.append(plots.plot_calibration(scores, conformal_threshold(scores, REPORT_FPR), REPORT_FPR,
                                          score_name, folder / "calibration.png"))
    return [*written, write_index(metadata, [p.name for p in written], folder, artifact.name)]


# ---- index.html --------------------------------------------------------------------------------

PAGE = Template("""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Training report: $name</title>
<style>
body { font-family: system-ui, sans-serif; color: #1f2328; background: #f5f6f8; margin: 0; line-height: 1.45; }
main { max-width: 980px; margin: 0 auto; padding: 1.5rem; }
section { background: #fff; border: 1px solid #d8dce2; border-radius: 8px; padding: 1rem 1.2rem; margin: 1rem 0; }
h1 { margin: 0 0 0.3rem; } h2 { margin: 0 0 0.5rem; font-size: 1.15rem; }
table { border-collapse: collapse; } th, td { text-align: left; padding: 0.3rem 0.8rem 0.3rem 0; vertical-align: top; }
th { color: #5b636e; font-weight: 600; white-space: nowrap; } td code { font-size: 0.85em; }
img { max-width: 100%; height: auto; } .muted { color: #5b636e; }
</style>
</head>
<body>
<main>
<h1>Training report: $name</h1>
<p class="muted">Artifact <code>$artifact</code>, created $created.</p>
<section id="summary">
<h2>Summary</h2>
<table>
$rows
</table>
</section>
$sections
</main>
</body>
</html>
""")


def write_index(metadata: dict[str, Any], images: list[str], folder: Path, artifact_name: str) -> Path:
    """index.html: the summary table, then each written plot under its heading (relative links,
    so the folder can be moved or opened straight from disk)."""
    rows = "\n".join(f"<tr><th>{html.escape(label)}</th><td>{html.escape(value)}</td></tr>"
                     for label, value in summary_rows(metadata))
    sections = "\n".join(
        f'<section id="{html.escape(Path(s.file).stem)}">\n<h2>{html.escape(s.heading)}</h2>\n'
        f'<p class="muted">{html.escape(s.caption)}</p>\n'
        f'<img src="{html.escape(s.file)}" alt="{html.escape(s.heading)}">\n</section>'
        for s in SECTIONS if s.file in images)
    name = str(metadata.get("name", folder.name))
    page = PAGE.substitute(name=html.escape(name), artifact=html.escape(artifact_name),
                           created=html.escape(str(metadata.get("created", "unknown"))), rows=rows,
                           sections=sections)
    path = folder / "index.html"
    path.write_text(page, encoding="utf-8")
    return path


def summary_rows(metadata: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, text) pairs for the summary table, from the artifact's metadata."""
    data, arch = metadata.get("data", {}), metadata.get("architecture", {})
    metrics, calibration = metadata.get("metrics", {}), metadata["calibration"]
    config = metadata.get("training", {}).get("config", {})
    splits = data.get("splits") or {}
    threshold = conformal_threshold(np.asarray(calibration["scores"]), REPORT_FPR)
    widths = arch.get("conv_channels") if arch.get("arch") == "conv" else arch.get("hidden")
    return [
        ("data", f"{data.get('source')}: {count(data.get('images'))} images of {data.get('channels')}x"
                 f"{data.get('height')}x{data.get('width')}"
                 + (f", class {data['class_filter']} only" if data.get("class_filter") is not None else "")),
        ("split", ", ".join(f"{k} {count(v)}" for k, v in splits.items()) or "unknown"),
        ("architecture", f"{arch.get('arch')} {list(widths or [])}, latent {arch.get('latent_dim')}, "
                         f"{arch.get('likelihood')} likelihood, {arch.get('parameters', 0):,} parameters"),
        ("epochs", f"{metrics.get('epochs_run', '?')} run of {config.get('epochs', '?')}, "
                   f"{duration(metrics.get('train_seconds'))}"),
        ("best epoch", str(metrics.get("best_epoch", "?"))),
        ("test -ELBO", f"{number(metrics.get('test_elbo'))} nats per image (importance-weighted bound on "
                       f"-log p(x): {number(metrics.get('test_nll_iwae'))})"),
        ("score kind", f"{calibration.get('score_kind')} ({metadata.get('score', {}).get('units', 'nats per image')})"),
        (f"threshold at {REPORT_FPR * 100:g}% FPR",
         number(threshold) if threshold is not None else f"none: too few calibration scores for {REPORT_FPR:g}"),
        ("calibration size", f"{len(calibration['scores'])} images"),
        ("command", str(metadata.get("training", {}).get("command", "unknown"))),
    ]


def number(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, int | float) else "unknown"


def count(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else "?"


def duration(seconds: Any) -> str:
    if not isinstance(seconds, int | float):
        return "time unknown"
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


# ---- an existing artifact ----------------------------------------------------------------------

def regenerate_report(artifact: Path) -> list[Path]:
    """(Re)write `<stem>-report/` for an artifact without retraining; returns the files written."""
    module, metadata = load_artifact(artifact)
    return write_report(module, metadata, artifact_splits(metadata), artifact)
