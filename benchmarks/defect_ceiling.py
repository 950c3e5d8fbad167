"""How separable is each synthetic defect kind at all? A supervised ceiling for `make eval`'s defects suite.

Run from the repository root:  .venv/bin/python -m benchmarks.defect_ceiling [--kinds contrast,blur] [--epochs 6]

The evaluation's detectors never see a defect. Its supervised reference (`training.reference`) is
the artifact's small segmenter trained on the very defects, so its misses mix "this network is
small" with "these images cannot be told apart". This benchmark asks only the second question: an
image-level CNN classifier (six 3x3 conv layers, about 640k weights, max-pooled over the image) is
trained per defect kind on the artifact's training split, half the images clean and half with that
kind (drawn with the reference's seeds, never the test's), and is tested on exactly the defects
suite's images: the first 1,000 of the test split, clean and with the kind at the evaluation's seed.
Its AUROC says how much of a kind a supervised model of modest size separates. It is not a detector
(it knows the defect), and it never ships.

It writes benchmarks/results/defect-ceiling.md and .png, beside the figures of the last
`make eval` (benchmarks/results/anomaly/results.json) for the same kinds, when that run has them.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import Tensor, nn
from tqdm import tqdm

from benchmarks.common import ROOT, comma_choices, command_line, isolated, made_by, shown
from training.defects import IMAGE_DEFECTS, defective_set
from training.evaluate import ANCHOR_NAMES, default_of
from training.export import artifact_splits, load_artifact
from training.plots import plt, save_figure
from training.reference import NAME as REFERENCE
from training.reference import SEED_OFFSET


@dataclass(frozen=True)
class Options:
    artifact: Path = ROOT / "models" / "fashion.pt"
    kinds: tuple[str, ...] = tuple(IMAGE_DEFECTS)
    images: int = 20_000            # training images per kind, half of them given the defect
    epochs: int = 6
    batch_size: int = 128
    test_images: int = 1000          # the defects suite's own count (training.evaluate --max-images)
    seed: int = 0                    # the evaluation's seed: the test defects are drawn with it
    threads: int = 2
    evaluation: Path = ROOT / "benchmarks" / "results" / "anomaly" / "results.json"
    out: Path = ROOT / "benchmarks" / "results" / "defect-ceiling"
    progress: bool = True


def classifier(channels: int) -> nn.Sequential:
    """Three stages of two 3x3 convs (48, 96, 192 channels, batch norm), 2x2 max pooling between
    them, and the strongest response anywhere in the image: a defect is local."""
    def stage(inputs: int, outputs: int) -> list[nn.Module]:
        return [nn.Conv2d(inputs, outputs, 3, padding=1), nn.BatchNorm2d(outputs), nn.ReLU(),
                nn.Conv2d(outputs, outputs, 3, padding=1), nn.BatchNorm2d(outputs), nn.ReLU()]

    return nn.Sequential(*stage(channels, 48), nn.MaxPool2d(2), *stage(48, 96), nn.MaxPool2d(2),
                         *stage(96, 192), nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(192, 1))


def training_set(images: np.ndarray, kind: str, count: int, seed: int) -> tuple[Tensor, Tensor]:
    """`count` training images (fewer if the split is smaller), the second half given `kind` with
    the reference's seed (the evaluation's plus SEED_OFFSET), and their labels (1 = defective)."""
    picked = images[np.random.default_rng(seed).permutation(len(images))[:count]]
    half = len(picked) // 2
    defective, _ = defective_set(picked[half:], kind, seed + SEED_OFFSET)
    x = torch.as_tensor(np.concatenate([picked[:half], defective]))
    return x, torch.cat([torch.zeros(half), torch.ones(len(picked) - half)])


def train_classifier(x: Tensor, y: Tensor, options: Options, desc: str) -> nn.Sequential:
    """AdamW with a one-cycle schedule; each batch half mirrored left to right (a mirrored image is
    clean or defective exactly when the original is)."""
    torch.manual_seed(options.seed)
    model = classifier(x.shape[1])
    batches = max(1, len(x) // options.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=options.epochs * batches)
    model.train()
    bar = tqdm(total=options.epochs * batches, desc=desc, unit="batch", leave=False, disable=not options.progress)
    for _ in range(options.epochs):
        order = torch.randperm(len(x))
        for start in range(0, batches * options.batch_size, options.batch_size):
            picked = order[start:start + options.batch_size]
            mirror = (torch.rand(len(picked)) < 0.5).view(-1, 1, 1, 1)
            batch = torch.where(mirror, x[picked].flip(3), x[picked])
            loss = F.binary_cross_entropy_with_logits(model(batch).squeeze(1), y[picked])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    return model.eval()


@torch.no_grad()
def test_auroc(model: nn.Sequential, clean: np.ndarray, kind: str, seed: int) -> float:
    """AUROC of the classifier's logit on the clean test images against their defective copies,
    drawn exactly as `training.evaluate`'s defects suite draws them."""
    defective, _ = defective_set(clean, kind, seed)
    logits = torch.cat([model(torch.as_tensor(images)).squeeze(1) for images in (clean, defective)])
    labels = np.r_[np.zeros(len(clean)), np.ones(len(defective))]
    return float(roc_auc_score(labels, logits.numpy()))


def evaluation_figures(path: Path, dataset: str) -> tuple[dict[str, dict[str, float]], str]:
    """Per kind, the AUROC of the artifact's default score, the supervised reference and the best
    anchor (by mean), in that order, in the last evaluation run, and when it ran ('' if it has no
    such suite)."""
    if not path.exists():
        return {}, ""
    run = json.loads(path.read_text())
    metrics = run.get("defects", {}).get(dataset, {}).get("metrics", {})
    if not metrics:
        return {}, ""
    default = default_of(metrics)
    anchor = max((a for a in ANCHOR_NAMES if a in metrics), key=lambda a: metrics[a]["mean"]["auroc"], default=None)
    columns = {default: f"`{default}`", REFERENCE: REFERENCE, anchor: f"best anchor ({anchor})"}
    figures = {kind: {label: metrics[name][kind]["auroc"] for name, label in columns.items()
                      if name in metrics and kind in metrics[name]} for kind in IMAGE_DEFECTS}
    return figures, str(run.get("started", ""))


def write_report(ceiling: dict[str, float], seconds: dict[str, float], options: Options, metadata: dict[str, Any],
                 train_images: int, command: str) -> Path:
    """The markdown table (and the plot beside it): the ceiling per kind beside the last evaluation."""
    dataset = metadata["data"]["source"]
    figures, started = evaluation_figures(options.evaluation, dataset)
    labels = list(dict.fromkeys(label for row in figures.values() for label in row))   # in their order
    rows = [[kind.replace("_", " "), f"**{ceiling[kind]:.3f}**",
             *(_cell(figures.get(kind, {}), label) for label in labels), f"{seconds[kind]:.0f}"] for kind in ceiling]
    mean = ["**mean**", f"**{np.mean(list(ceiling.values())):.3f}**",
            *(_mean_cell(figures, list(ceiling), label) for label in labels), f"{sum(seconds.values()):.0f}"]
    header = ["kind", "supervised CNN (ceiling)", *labels, "seconds"]
    table = [header, ["---"] * len(header), *rows, mean]
    source = (f"the last `make eval` run ({started}, `{shown(options.evaluation)}`)" if figures
              else "no `make eval` results for this data set")
    lines = [
        f"# How separable each defect kind is: a supervised ceiling ({dataset})", "",
        made_by(command, sum(seconds.values())), "",
        f"- artifact: `{shown(options.artifact)}` (its training split: {train_images} images; its test split's "
        f"first {options.test_images} are the defects suite's clean images)",
        f"- per kind: a CNN classifier ({_weights(metadata):,} weights) trained for {options.epochs} epochs on "
        f"{min(options.images, train_images)} training images, half given the kind "
        f"(seed {options.seed + SEED_OFFSET}), then tested on the suite's clean images against the same images "
        f"with the kind (seed {options.seed}), as "
        "`training.evaluate` draws them",
        f"- beside it, the AUROC of {source}: the artifact's default score, the supervised reference "
        "(the artifact's segmenter trained on the suite's defects) and the anchor with the best mean",
        "- the ceiling knows the defect it is tested on: it is not a detector, and a detector that never sees "
        "a defect should not be expected to beat it (a larger supervised model might)", "",
        *("| " + " | ".join(row) + " |" for row in table), "",
        f"![AUROC per kind]({options.out.name}.png)", ""]
    options.out.parent.mkdir(parents=True, exist_ok=True)
    path = options.out.with_suffix(".md")
    path.write_text("\n".join(lines))
    plot(ceiling, figures, labels, dataset, options.out.with_suffix(".png"))
    return path


def plot(ceiling: dict[str, float], figures: dict[str, dict[str, float]], labels: list[str], dataset: str,
         path: Path) -> None:
    kinds = list(ceiling)
    series = {"supervised CNN (ceiling)": [ceiling[k] for k in kinds]}
    series.update({label: [figures.get(k, {}).get(label, np.nan) for k in kinds] for label in labels})
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(8.5, 1.3 * len(kinds) + 2.5), 3.8))
    for i, (label, values) in enumerate(series.items()):
        ax.bar(np.arange(len(kinds)) + (i - (len(series) - 1) / 2) * width, values, width, label=label.replace("`", ""))
    ax.axhline(0.97, color="grey", linestyle="--", linewidth=0.8, label="target per kind (0.97)")
    ax.set_xticks(np.arange(len(kinds)), [k.replace("_", "\n") for k in kinds])
    ax.set_ylim(0.4, 1.0)
    ax.set_ylabel("AUROC")
    ax.set_title(f"{dataset}: how separable each defect kind is")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))       # beside the bars, not over them
    save_figure(fig, path)


def _cell(row: dict[str, float], label: str) -> str:
    return f"{row[label]:.3f}" if label in row else ""


def _mean_cell(figures: dict[str, dict[str, float]], kinds: list[str], label: str) -> str:
    values = [figures[k][label] for k in kinds if label in figures.get(k, {})]
    return f"{np.mean(values):.3f}" if len(values) == len(kinds) else ""


def _weights(metadata: dict[str, Any]) -> int:
    return sum(p.numel() for p in classifier(metadata["input"]["channels"]).parameters())


def run(options: Options, command: str) -> Path:
    """Train and test a classifier per kind and write the report; the caller's torch threads and
    random stream are left as they were (the tests call this in process)."""
    with isolated(options.threads):
        return _measure(options, command)


def _measure(options: Options, command: str) -> Path:
    _, metadata = load_artifact(options.artifact)
    splits = artifact_splits(metadata)
    clean = splits.test.images[:options.test_images]
    ceiling, seconds = {}, {}
    for kind in options.kinds:
        started = time.perf_counter()
        x, y = training_set(splits.train.images, kind, options.images, options.seed)
        model = train_classifier(x, y, options, desc=kind)
        ceiling[kind] = test_auroc(model, clean, kind, options.seed)
        seconds[kind] = time.perf_counter() - started
        tqdm.write(f"{kind}: AUROC {ceiling[kind]:.3f} ({seconds[kind]:.0f} s)")
    return write_report(ceiling, seconds, options, metadata, len(splits.train.images), command)


def parse_options(argv: list[str] | None) -> Options:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.defect_ceiling", description=__doc__.splitlines()[0])
    defaults = Options()
    parser.add_argument("--artifact", type=Path, default=defaults.artifact)
    parser.add_argument("--kinds", default=",".join(defaults.kinds), help="comma-separated defect kinds")
    parser.add_argument("--images", type=int, default=defaults.images, help="training images per kind")
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--test-images", type=int, default=defaults.test_images)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--threads", type=int, default=defaults.threads)
    parser.add_argument("--evaluation", type=Path, default=defaults.evaluation,
                        help="a training.evaluate results.json to compare with")
    parser.add_argument("--out", type=Path, default=defaults.out, help="report path without suffix")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    kinds = comma_choices(parser, "--kinds", args.kinds, IMAGE_DEFECTS)
    if args.images < 4 or args.epochs < 1 or args.test_images < 2:
        parser.error("--images must be at least 4, --epochs at least 1, --test-images at least 2")
    return Options(artifact=args.artifact, kinds=kinds, images=args.images, epochs=args.epochs,
                   test_images=args.test_images, seed=args.seed, threads=args.threads, evaluation=args.evaluation,
                   out=args.out, progress=not args.no_progress)


def main(argv: list[str] | None = None) -> int:
    options = parse_options(argv)
    path = run(options, command_line("benchmarks.defect_ceiling", argv))
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
