"""The pictures written beside an artifact: the seed's loss curves, inputs beside their
reconstructions, samples, the latent space coloured by label, the decoded manifold, and the
calibration scores with their threshold."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402


def plot_losses(history: list[dict[str, float]], path: Path) -> Path:
    """rec / reg (KL) / total per epoch, train solid and validation dashed, as the seed plots."""
    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, label, colour in (("rec", "rec error", "C0"), ("kl", "reg error (KL)", "C1"),
                               ("total", "total error (-ELBO)", "C2")):
        ax.plot(epochs, [h[f"train_{key}"] for h in history], color=colour, label=f"{label}, train")
        ax.plot(epochs, [h[f"val_{key}"] for h in history], color=colour, ls="--", label=f"{label}, validation")
    ax.set_xlabel("epoch")
    ax.set_ylabel("nats per image")
    ax.set_title("training losses")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def image_grid(images: np.ndarray, columns: int) -> np.ndarray:
    """(N, C, H, W) in [0, 1] tiled into one (H', W') or (H', W', 3) picture, 1-pixel gaps."""
    n, c, h, w = images.shape
    rows = -(-n // columns)
    grid = np.ones((rows * (h + 1) - 1, columns * (w + 1) - 1, c), dtype=np.float32)
    for i, image in enumerate(images):
        r, k = divmod(i, columns)
        grid[r * (h + 1):r * (h + 1) + h, k * (w + 1):k * (w + 1) + w] = image.transpose(1, 2, 0)
    return grid[..., 0] if c == 1 else grid


def plot_grid(images: np.ndarray, columns: int, title: str, path: Path) -> Path:
    grid = image_grid(images, columns)
    width = min(12.0, 0.5 + columns * 0.7)
    fig, ax = plt.subplots(figsize=(width, 0.5 + width * grid.shape[0] / grid.shape[1]))
    ax.imshow(grid, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_title(title)
    ax.axis("off")
    return save_figure(fig, path)


def plot_reconstructions(inputs: np.ndarray, recons: np.ndarray, path: Path) -> Path:
    """Inputs in the odd rows, their reconstructions in the row below."""
    n = min(len(inputs), 10)
    rows = np.concatenate([inputs[:n], recons[:n]])
    return plot_grid(rows, n, "inputs (top) and reconstructions (bottom)", path)


def latent_2d(mu: np.ndarray) -> tuple[np.ndarray, str]:
    """The latent means themselves for d = 2, else their first two principal components."""
    if mu.shape[1] == 2:
        return mu, "z"
    centred = mu - mu.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return centred @ vt[:2].T, "principal component"


def plot_latent(mu: np.ndarray, labels: np.ndarray | None, class_names: list[str] | None, path: Path) -> Path:
    points, axis_name = latent_2d(mu)
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    if labels is None:
        ax.scatter(points[:, 0], points[:, 1], s=4, alpha=0.6)
    else:
        for value in np.unique(labels):
            pick = labels == value
            name = class_names[value] if class_names and value < len(class_names) else str(value)
            ax.scatter(points[pick, 0], points[pick, 1], s=4, alpha=0.7, label=name,
                       color=plt.cm.tab10(int(value) % 10))
        ax.legend(markerscale=3, fontsize=8, loc="best")
    ax.set_xlabel(f"{axis_name} 1")
    ax.set_ylabel(f"{axis_name} 2")
    ax.set_title("latent means of held-out images")
    return save_figure(fig, path)


def plot_manifold(decode: Callable[[torch.Tensor], torch.Tensor], path: Path, steps: int = 15) -> Path:
    """Images decoded on a grid of z over the prior's quantiles (5% to 95%), for d = 2:
    the seed's 'adjusting z creates continuously varying data', made visible."""
    quantiles = torch.linspace(0.05, 0.95, steps)
    values = torch.distributions.Normal(0.0, 1.0).icdf(quantiles)
    z1, z2 = torch.meshgrid(values, values.flip(0), indexing="xy")
    z = torch.stack([z1.reshape(-1), z2.reshape(-1)], dim=1)       # row by row, z2 falling
    with torch.no_grad():
        images = decode(z).numpy()
    return plot_grid(images, steps, "decoded manifold (z over the prior's 5%-95% quantiles)", path)


def plot_calibration(scores: np.ndarray, threshold: float | None, fpr: float, score_name: str, path: Path) -> Path:
    """The held-out normal images' scores, with the threshold the service flags above at `fpr`
    (None: too few scores to promise that rate)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.hist(scores, bins=min(60, max(10, len(scores) // 5)), color="C0", alpha=0.8)
    if threshold is not None:
        flagged = int(np.sum(np.asarray(scores) > threshold))
        ax.axvline(threshold, color="C3", lw=2,
                   label=f"threshold at {fpr * 100:g}% FPR: {threshold:.2f} ({flagged} of {len(scores)} above)")
        ax.legend(fontsize=8)
    else:
        ax.set_title(f"(too few scores for a {fpr * 100:g}% FPR threshold)", fontsize=8, loc="right")
    ax.set_xlabel(f"{score_name} (higher is more anomalous)")
    ax.set_ylabel("calibration images")
    ax.set_title(f"calibration scores (n = {len(scores)})", loc="left")
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def save_figure(fig: plt.Figure, path: Path) -> Path:
    """Write the figure (creating its folder) and free it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
