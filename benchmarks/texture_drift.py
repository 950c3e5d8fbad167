"""Why the texture artifacts flag more than 1% of clean patches: the threshold, or the photograph?

Run from the repository root:  .venv/bin/python -m benchmarks.texture_drift [--textures brick]

`make eval`'s textures split each scikit-image photograph into three vertical bands: the VAE trains
on the left one, the conformal threshold is set on the middle one, and clean patches of the right
one are scored (`training.evaluate.texture_patches`). On brick, far more than 1% of those clean
patches come out above the 1% threshold. A conformal threshold promises its rate only when the
calibration patches are exchangeable with the scored ones, so this benchmark scores the test band
against thresholds set in two places:

- **as shipped**: the threshold from the middle band, as the service would apply it;
- **in band**: thresholds from the test band itself, on patches that share no pixel with the scored
  ones, split two ways: its top half of patch rows against the rows below them, and alternate
  horizontal stripes of 128 pixels against the others (so both sides reach across the band's height).

In-band rates near the nominal one where the shipped rate is not would say the threshold rule holds
and the bands differ. In-band rates far from it say the band drifts inside itself too, and that no
region of one photograph is exchangeable with another. Either way an operator should calibrate on
images from where the service is deployed (`python -m training calibrate ... --data`).

It uses `make eval`'s cached texture artifacts (training them on first use, about 10 minutes each
on 2 cores) and writes benchmarks/results/texture-drift.md and .png: the table, the score of every
clean patch across the photograph against the shipped threshold, and the test band's scores down its
height against all three thresholds.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from benchmarks.common import ROOT, comma_choices, command_line, isolated, made_by
from training import evaluate
from training.evaluate import TEXTURE_BANDS, TEXTURES, binomial_interval, conformal_threshold, flagged
from training.export import load_artifact, score_images
from training.plots import plt, save_figure

PATCH = 64                    # the texture patches' side (training.evaluate.texture_patches)
BANDS = ("train", "cal", "test")
STRIPE = 128                  # the interleaved split's stripes: two patch sides, so each holds whole patches


@dataclass(frozen=True)
class Options:
    textures: tuple[str, ...] = TEXTURES
    rates: tuple[float, ...] = (0.01, 0.05)
    cache: Path = evaluate.Options().cache        # make eval's: the artifacts are trained once for both
    threads: int = 2
    out: Path = ROOT / "benchmarks" / "results" / "texture-drift"
    progress: bool = True


def patch_positions(height: int, width: int, stride: int, size: int = PATCH,
                    bands: tuple[float, float] = TEXTURE_BANDS) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per band, the (top, left) pixel of each patch in the whole photograph, in the order
    `training.evaluate.texture_patches` crops them (row by row within each band)."""
    cuts = [0, *(int(round(width * cut)) for cut in bands), width]
    positions = {}
    for band, start, stop in zip(BANDS, cuts[:-1], cuts[1:], strict=True):
        tops = np.arange(0, height - size + 1, stride)
        lefts = np.arange(0, stop - start - size + 1, stride)
        positions[band] = (np.repeat(tops, len(lefts)), start + np.tile(lefts, len(tops)))
    return positions


def top_and_bottom(tops: np.ndarray, size: int = PATCH) -> tuple[np.ndarray, np.ndarray]:
    """Masks over a band's patches: the top half of its patch rows (to calibrate on), and the rows
    below them that share no pixel with any of those (to score)."""
    rows = np.unique(tops)
    calibration = tops <= rows[max(len(rows) // 2 - 1, 0)]
    first_free = tops[calibration].max() + size
    return calibration, tops >= first_free


def interleaved(tops: np.ndarray, size: int = PATCH, stripe: int = STRIPE) -> tuple[np.ndarray, np.ndarray]:
    """Masks over a band's patches: those wholly inside the even horizontal stripes of `stripe`
    pixels (to calibrate on) and those wholly inside the odd ones (to score). The two share no pixel
    and both reach from the top of the band to its bottom; patches across a stripe's edge are left out."""
    inside = tops % stripe <= stripe - size
    even = (tops // stripe) % 2 == 0
    return inside & even, inside & ~even


SPLITS = {"top and bottom": top_and_bottom, "interleaved stripes": interleaved}


def measure(scores: np.ndarray, shipped: np.ndarray, tops: np.ndarray, rates: tuple[float, ...]) -> dict[str, Any]:
    """The share of the whole band above the shipped threshold and, per in-band split, of its scored
    patches above the shipped threshold and above the split's own, per rate."""
    result: dict[str, Any] = {"band": len(scores), "shipped_calibration": len(shipped), "splits": {},
                              "band_as_shipped": {str(rate): flagged(scores, conformal_threshold(shipped, rate))
                                                  for rate in rates}}
    for split, masks in SPLITS.items():
        calibration, scored = masks(tops)
        result["splits"][split] = {
            "calibration": int(calibration.sum()), "scored": int(scored.sum()),
            "as_shipped": {str(rate): flagged(scores[scored], conformal_threshold(shipped, rate)) for rate in rates},
            "in_band": {str(rate): flagged(scores[scored], conformal_threshold(scores[calibration], rate))
                        for rate in rates}}
    return result


def texture_scores(name: str, options: Options) -> tuple[dict[str, np.ndarray], np.ndarray, dict[str, Any], tuple]:
    """Every clean patch's default score, per band; the shipped calibration scores; the metadata;
    and the photograph's (height, width)."""
    settings = evaluate.Options(cache=options.cache, progress=options.progress)
    path, bands = evaluate.texture_artifact(settings, name)
    module, metadata = load_artifact(path)
    with torch.no_grad():
        scores = {band: score_images(module, patches[:, None].astype(np.float32) / np.float32(255))
                  for band, patches in bands.items()}
    from skimage import data as textures

    shape = getattr(textures, name)().shape[:2]
    return scores, np.asarray(metadata["calibration"]["scores"]), metadata, shape


def run(options: Options, command: str) -> Path:
    """Measure every texture and write the report; the caller's torch threads and random stream are
    left as they were."""
    with isolated(options.threads):
        return _measure(options, command)


def _measure(options: Options, command: str) -> Path:
    started = time.perf_counter()
    results, curves = {}, {}
    for name in tqdm(options.textures, desc="textures", disable=not options.progress):
        scores, shipped, metadata, (height, width) = texture_scores(name, options)
        positions = patch_positions(height, width, evaluate.Options().texture_stride)
        results[name] = {**measure(scores["test"], shipped, positions["test"][0], options.rates),
                         "score": metadata["calibration"]["score_kind"]}
        curves[name] = {"scores": scores, "positions": positions, "shipped": shipped,
                        "bands": [int(round(width * cut)) for cut in TEXTURE_BANDS]}
        at_1 = {split: block["in_band"][str(options.rates[0])] for split, block in results[name]["splits"].items()}
        tqdm.write(f"{name}: whole band as shipped {results[name]['band_as_shipped'][str(options.rates[0])]:.1%}, "
                   f"in band {at_1}")
    return write_report(results, curves, options, command, time.perf_counter() - started)


def _rate_cell(share: float, total: int) -> str:
    low, high = binomial_interval(round(share * total), total)
    return f"{share:.1%} ({low:.1%}-{high:.1%})"


def result_rows(results: dict[str, Any]) -> list[list[str]]:
    """A row per texture and rate: the whole band as shipped, then per split as shipped and in band."""
    rows = []
    for name, block in results.items():
        for rate in block["band_as_shipped"]:
            cells = [_rate_cell(block["band_as_shipped"][rate], block["band"])]
            for split in block["splits"].values():
                cells += [_rate_cell(split[way][rate], split["scored"]) for way in ("as_shipped", "in_band")]
            rows.append([name, f"`{block['score']}`", f"{float(rate):.0%}", *cells])
    return rows


def write_report(results: dict[str, Any], curves: dict[str, Any], options: Options, command: str,
                 seconds: float) -> Path:
    header = ["texture", "score", "nominal", "whole test band, as shipped",
              *(f"{split}: {way}" for split in SPLITS for way in ("as shipped", "in band"))]
    table = [header, ["---"] * len(header), *result_rows(results)]
    counts = "; ".join(f"{name}: {block['band']} test patches, {block['shipped_calibration']} shipped calibration, "
                       + ", ".join(f"{split} {b['calibration']} to calibrate and {b['scored']} scored"
                                   for split, b in block["splits"].items()) for name, block in results.items())
    lines = [
        "# Texture false positives: the threshold, or the photograph drifting?", "",
        made_by(command, seconds), "",
        "- each texture's `make eval` artifact: trained on the left band of the photograph, its threshold "
        "set on the middle band (**as shipped**), scored on clean patches of the right band",
        "- **in band**: a threshold set on some of the right band's patches, applied to others that share "
        "no pixel with them, split two ways: **top and bottom** (the top half of the patch rows calibrates, "
        f"the rows below them are scored) and **interleaved stripes** (horizontal stripes of {STRIPE} px, "
        "alternately calibrating and scored, so both reach across the band's height)",
        "- share of clean patches flagged, with its 95% Clopper-Pearson interval (the patches overlap, so "
        "they are fewer independent samples than the interval assumes); the service's conformal rule "
        "throughout (`training.report.conformal_threshold`)",
        f"- patches: {counts}", "",
        *("| " + " | ".join(row) + " |" for row in table), "",
        "The plot: above, every clean patch's score against where its centre lies across the photograph, "
        "the three bands shaded; below, the test band's patches against their height in the photograph. "
        "The dashed line is the shipped 1% threshold, the dotted ones the in-band thresholds.", "",
        f"![scores across the photograph]({options.out.name}.png)", ""]
    path = options.out.with_suffix(".md")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    plot(curves, results, options.out.with_suffix(".png"))
    return path


def plot(curves: dict[str, Any], results: dict[str, Any], path: Path) -> None:
    fig, axes = plt.subplots(2, len(curves), figsize=(4.6 * len(curves), 6.6), squeeze=False)
    for column, (name, curve) in enumerate(curves.items()):
        across, down = axes[0][column], axes[1][column]
        edges = [0, *curve["bands"], max(curve["positions"]["test"][1]) + PATCH]
        for band, left, right, colour in zip(BANDS, edges[:-1], edges[1:], ("C0", "C1", "C2"), strict=True):
            across.axvspan(left, right, color=colour, alpha=0.08)
            across.scatter(curve["positions"][band][1] + PATCH / 2, curve["scores"][band], s=3, color=colour,
                           alpha=0.5, label={"train": "training band", "cal": "calibration band",
                                             "test": "test band"}[band])
        tops, test = curve["positions"]["test"][0], curve["scores"]["test"]
        down.scatter(tops + PATCH / 2, test, s=3, color="C2", alpha=0.5)
        for ax in (across, down):
            ax.axhline(conformal_threshold(curve["shipped"], 0.01), color="k", linestyle="--", linewidth=0.9,
                       label="shipped 1% threshold")
        for (split, masks), colour in zip(SPLITS.items(), ("C3", "C4"), strict=True):
            calibration, _ = masks(tops)
            down.axhline(conformal_threshold(test[calibration], 0.01), color=colour, linestyle=":", linewidth=1.2,
                         label=f"1% threshold, {split}")
        across.set_title(f"{name} ({results[name]['score']})")
        across.set_xlabel("patch centre, pixels from the left")
        down.set_xlabel("test band: patch centre, pixels from the top")
        across.set_ylabel("score of a clean patch")
        down.set_ylabel("score of a clean patch")
    axes[0][0].legend(fontsize=7, markerscale=3)
    axes[1][0].legend(fontsize=7, loc="best")
    save_figure(fig, path)


def parse_options(argv: list[str] | None) -> Options:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.texture_drift", description=__doc__.splitlines()[0])
    defaults = Options()
    parser.add_argument("--textures", default=",".join(defaults.textures), help="comma separated")
    parser.add_argument("--cache", type=Path, default=defaults.cache, help="make eval's artifact cache")
    parser.add_argument("--threads", type=int, default=defaults.threads)
    parser.add_argument("--out", type=Path, default=defaults.out, help="report path without suffix")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    textures = comma_choices(parser, "--textures", args.textures, TEXTURES)
    return Options(textures=textures, cache=args.cache, threads=args.threads, out=args.out,
                   progress=not args.no_progress)


def main(argv: list[str] | None = None) -> int:
    options = parse_options(argv)
    path = run(options, command_line("benchmarks.texture_drift", argv))
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
