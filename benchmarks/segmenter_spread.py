"""How far do the `learned` and `fused` figures move when only the defect segmenter's seed changes?

Run from the repository root:
    .venv/bin/python -m benchmarks.segmenter_spread                      # models/fashion.pt
    .venv/bin/python -m benchmarks.segmenter_spread --texture brick      # make eval's brick model
    .venv/bin/python -m benchmarks.segmenter_spread --jobs 2 --threads 1 # two seeds at once, one core each
    .venv/bin/python -m benchmarks.segmenter_spread --levels 3           # the deeper segmenter instead

The segmenter (`training.segmenter`) is the one part of the default score trained from random
numbers after the VAE: its initial weights, its stream of synthetic corruptions and its sample of
training images. A change to the detector that moves `make eval`'s figures by less than they move
between two such seeds is not a finding. This benchmark keeps the artifact's VAE and local
statistics, trains a fresh segmenter for as many steps as the artifact's own with each of a few
seeds (each seed sets all three), and scores the defects as `make eval` does: the defects suite's
clean images (the first 1,000 of the artifact's test split, or a texture's test band) against the
same images with each defect kind at the evaluation's seed.

It writes benchmarks/results/segmenter-spread-<name>.md and .png.
"""

from __future__ import annotations

import argparse
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from tqdm import tqdm

from benchmarks.common import ROOT, command_line, isolated, made_by, shown
from training import evaluate
from training.calibrate import rebuild_servable
from training.defects import IMAGE_DEFECTS, TEXTURE_DEFECTS, defective_set
from training.evaluate import TEXTURES
from training.export import (
    artifact_splits,
    fit_defect_segmenter,
    fit_local_statistics,
    load_artifact,
    score_images,
    segmenter_levels_of,
    segmenter_steps_of,
)
from training.plots import plt, save_figure
from training.scoring import ServableVAE
from training.segmenter import LEVEL_CHOICES, build_segmenter

KINDS = ("learned", "fused")


@dataclass(frozen=True)
class Options:
    artifact: Path = ROOT / "models" / "fashion.pt"
    texture: str | None = None           # a make eval texture model instead of --artifact
    seeds: tuple[int, ...] = (1, 2, 3, 4)
    steps: int | None = None             # None: as many as the artifact's own segmenter
    levels: int | None = None            # None: as many as the artifact's own segmenter (2 or 3)
    test_images: int = 1000              # the defects suite's count (training.evaluate --max-images)
    defect_seed: int = 0                 # the evaluation's
    cache: Path = evaluate.Options().cache
    threads: int = 2                     # torch threads per seed
    jobs: int = 1                        # seeds trained at once, each in its own process
    out: Path | None = None              # default: benchmarks/results/segmenter-spread-<name>
    progress: bool = True


@dataclass
class Subject:
    """The artifact under test, the clean images scored, and the defect kinds applied to them."""
    name: str
    path: Path
    module: torch.jit.ScriptModule
    metadata: dict[str, Any]
    clean: np.ndarray
    kinds: tuple[str, ...]


def load_subject(options: Options) -> Subject:
    if options.texture:
        path, bands = evaluate.texture_artifact(evaluate.Options(cache=options.cache, progress=options.progress),
                                                options.texture)
        clean = bands["test"][:options.test_images, None].astype(np.float32) / np.float32(255)
        module, metadata = load_artifact(path)
        return Subject(options.texture, path, module, metadata, clean, tuple(TEXTURE_DEFECTS))
    module, metadata = load_artifact(options.artifact)
    clean = artifact_splits(metadata).test.images[:options.test_images]
    return Subject(str(metadata.get("name", options.artifact.stem)), options.artifact, module, metadata, clean,
                   tuple(IMAGE_DEFECTS))


def retrained(subject: Subject, seed: int, steps: int, progress: bool, levels: int | None = None) -> ServableVAE:
    """The artifact with a fresh segmenter of `levels` (None: as many as the artifact's), initialised
    and trained from `seed` (which also draws its corruptions and its sample of training images)."""
    servable = rebuild_servable(subject.module, subject.metadata, "fused")
    splits = artifact_splits(subject.metadata)
    if not servable.local_fitted:         # an artifact exported before `local` (the shipped digits)
        fit_local_statistics(servable, splits, seed)
    torch.manual_seed(seed)
    servable.segmenter = build_segmenter(subject.metadata["input"]["channels"], servable.segmenter.width,
                                         levels or servable.segmenter.levels)
    fit_defect_segmenter(servable, splits, steps, seed, progress)
    return servable.eval()


@torch.no_grad()
def aurocs(model: torch.nn.Module, clean: np.ndarray, defective: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Per score kind, the AUROC of each defect kind (and their mean): clean against defective."""
    labels = np.r_[np.zeros(len(clean)), np.ones(len(clean))]
    clean_scores = {kind: score_images(model, clean, kind) for kind in KINDS}
    result: dict[str, dict[str, float]] = {}
    for kind in KINDS:
        result[kind] = {defect: float(roc_auc_score(labels, np.r_[clean_scores[kind],
                                                                  score_images(model, images, kind)]))
                        for defect, images in defective.items()}
        result[kind]["mean"] = float(np.mean(list(result[kind].values())))
    return result


def run(options: Options, command: str) -> Path:
    """Retrain and score per seed and write the report; the caller's torch threads and random
    stream are left as they were."""
    with isolated(options.threads):
        return _measure(options, command)


def defective_sets(subject: Subject, defect_seed: int) -> dict[str, np.ndarray]:
    """The subject's clean images with each defect kind, drawn as `make eval` draws them."""
    return {kind: defective_set(subject.clean, kind, defect_seed)[0] for kind in subject.kinds}


def seed_figures(options: Options, seed: int, steps: int) -> dict[str, dict[str, float]]:
    """One fresh segmenter's figures, from nothing but the options, so a worker process can run it:
    the TorchScript module does not pickle, so each worker loads the subject itself."""
    with isolated(options.threads):
        subject = load_subject(options)
        return aurocs(retrained(subject, seed, steps, False, options.levels), subject.clean,
                      defective_sets(subject, options.defect_seed))


def _measure(options: Options, command: str) -> Path:
    started = time.perf_counter()
    subject = load_subject(options)
    steps = options.steps or segmenter_steps_of(subject.metadata)
    if steps < 1:
        raise ValueError(f"{subject.path} has no defect segmenter to copy the steps of: pass --steps")
    defective = defective_sets(subject, options.defect_seed)
    figures = {}
    if segmenter_steps_of(subject.metadata):
        figures["shipped"] = aurocs(subject.module, subject.clean, defective)
    if options.jobs > 1:
        by_seed = _in_workers(options, steps)
    else:
        by_seed = {}
        for seed in tqdm(options.seeds, desc="seeds", disable=not options.progress):
            fresh = retrained(subject, seed, steps, options.progress, options.levels)
            by_seed[seed] = aurocs(fresh, subject.clean, defective)
            tqdm.write(f"seed {seed}: fused mean {by_seed[seed]['fused']['mean']:.3f}")
    figures |= {f"seed {seed}": by_seed[seed] for seed in options.seeds}
    out = options.out or ROOT / "benchmarks" / "results" / f"segmenter-spread-{subject.name}"
    return write_report(figures, subject, steps, options, out, command, time.perf_counter() - started)


def _in_workers(options: Options, steps: int) -> dict[int, dict[str, dict[str, float]]]:
    """Each seed in its own process, `options.jobs` at a time. Spawned, not forked: a forked child
    inherits torch's thread pool in whatever state the parent left it."""
    context = multiprocessing.get_context("spawn")
    by_seed = {}
    with ProcessPoolExecutor(max_workers=min(options.jobs, len(options.seeds)), mp_context=context) as pool:
        pending = {pool.submit(seed_figures, options, seed, steps): seed for seed in options.seeds}
        for done in tqdm(as_completed(pending), total=len(pending), desc="seeds", disable=not options.progress):
            seed = pending[done]
            by_seed[seed] = done.result()
            tqdm.write(f"seed {seed}: fused mean {by_seed[seed]['fused']['mean']:.3f}")
    return by_seed


def spread_rows(figures: dict[str, dict[str, dict[str, float]]], kind: str) -> list[list[str]]:
    """Per defect kind (and the mean): each run's AUROC, then the lowest, the highest and their range."""
    rows = []
    for defect in next(iter(figures.values()))[kind]:
        values = [run[kind][defect] for run in figures.values()]
        label = "**mean**" if defect == "mean" else defect.replace("_", " ")
        rows.append([label, *(f"{v:.3f}" for v in values), f"{min(values):.3f}", f"{max(values):.3f}",
                     f"**{max(values) - min(values):.3f}**"])
    return rows


def write_report(figures: dict[str, dict[str, dict[str, float]]], subject: Subject, steps: int, options: Options,
                 out: Path, command: str, seconds: float) -> Path:
    header = ["defect", *figures, "lowest", "highest", "range"]
    own_levels = segmenter_levels_of(subject.metadata)
    levels = options.levels or own_levels
    lines = [
        f"# How far the segmenter's seed moves the scores ({subject.name})", "",
        made_by(command, seconds), "",
        f"- artifact: `{shown(subject.path)}`; `shipped` is its own segmenter, each `seed N` a fresh one "
        f"trained from seed N (initial weights, corruptions, sample of training images) for {steps} steps, "
        f"with {levels} levels (the artifact's own: {own_levels}), the VAE and the local statistics unchanged",
        f"- AUROC of {len(subject.clean)} clean test images against the same images with each defect kind, drawn "
        f"with the evaluation's seed ({options.defect_seed}) as `make eval` draws them", ""]
    for kind in KINDS:
        table = [header, ["---"] * len(header), *spread_rows(figures, kind)]
        lines += [f"## `{kind}`", "", *("| " + " | ".join(row) + " |" for row in table), ""]
    lines += [f"![AUROC per seed]({out.name}.png)", ""]
    path = out.with_suffix(".md")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    plot(figures, subject.name, out.with_suffix(".png"))
    return path


def plot(figures: dict[str, dict[str, dict[str, float]]], name: str, path: Path) -> None:
    fig, axes = plt.subplots(1, len(KINDS), figsize=(6.2 * len(KINDS), 3.8), squeeze=False, sharey=True)
    for ax, kind in zip(axes[0], KINDS, strict=True):
        defects = list(next(iter(figures.values()))[kind])
        for i, (label, run) in enumerate(figures.items()):
            ax.scatter(np.arange(len(defects)), [run[kind][d] for d in defects], s=22, marker="o" if i else "D",
                       color="k" if label == "shipped" else f"C{i}", label=label, zorder=3 if i == 0 else 2)
        ax.set_xticks(np.arange(len(defects)), [d.replace("_", "\n") for d in defects], fontsize=7)
        ax.set_title(f"{name}: {kind}")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("AUROC")
    axes[0][-1].legend(fontsize=7, loc="lower left")
    save_figure(fig, path)


def parse_options(argv: list[str] | None) -> Options:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.segmenter_spread",
                                     description=__doc__.splitlines()[0])
    defaults = Options()
    parser.add_argument("--artifact", type=Path, default=defaults.artifact)
    parser.add_argument("--texture", choices=TEXTURES, default=None, help="make eval's texture model instead")
    parser.add_argument("--seeds", default=",".join(map(str, defaults.seeds)), help="comma-separated integers")
    parser.add_argument("--steps", type=int, default=None, help="segmenter steps (default: the artifact's own)")
    parser.add_argument("--levels", type=int, choices=LEVEL_CHOICES, default=None,
                        help="the fresh segmenters' levels (default: the artifact's own)")
    parser.add_argument("--test-images", type=int, default=defaults.test_images)
    parser.add_argument("--cache", type=Path, default=defaults.cache, help="make eval's artifact cache")
    parser.add_argument("--threads", type=int, default=defaults.threads, help="torch threads per seed")
    parser.add_argument("--jobs", type=int, default=defaults.jobs,
                        help="seeds trained at once, each in its own process (about jobs x threads cores)")
    parser.add_argument("--out", type=Path, default=None, help="report path without suffix")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        seeds = tuple(int(s) for s in args.seeds.split(",") if s)
    except ValueError:
        parser.error(f"--seeds must be comma-separated integers; got {args.seeds!r}")
    if not seeds or (args.steps is not None and args.steps < 1) or args.test_images < 2:
        parser.error("--seeds needs at least one seed, --steps at least 1, --test-images at least 2")
    if args.jobs < 1 or args.threads < 1:
        parser.error("--jobs and --threads must be at least 1")
    return Options(artifact=args.artifact, texture=args.texture, seeds=seeds, steps=args.steps, levels=args.levels,
                   test_images=args.test_images, cache=args.cache, threads=args.threads, jobs=args.jobs,
                   out=args.out, progress=not args.no_progress)


def main(argv: list[str] | None = None) -> int:
    options = parse_options(argv)
    path = run(options, command_line("benchmarks.segmenter_spread", argv))
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
