"""A density over local image statistics: the part of an anomaly score that sees missing detail.

A reconstruction error only rises where the input has something the model cannot reproduce, so a
defect that *removes* detail (blur, a region worn flat) lowers it. Here each window of the image
is described by eleven statistics of the input x, the reconstruction r and the residual e = x - r:

    mean x, mean r, log var x, log var r, mean e, log mean e^2,
    log mean |grad x|^2, log mean |grad r|^2, log mean (lap x)^2, log mean (lap r)^2, log mean |grad e|^2

and a Gaussian per window position, fitted on normal training images, says how far each window
is from what normal images show there (squared Mahalanobis distance). Too little variance or
gradient is as far as too much, so flattened, blurred and low-contrast regions stand out, and
the reconstruction terms tell "flat because this part of the object is flat" from "flattened".
Covariances are shrunk towards their mean over positions, so sparse positions stay well-posed.

`LocalDensity` is one window size, written for `torch.jit.script`; its buffers are empty until
`fit` fills them, and they travel in the artifact like weights. Images are averaged over channels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .model import transposed_conv_by_fold

FEATURES = 11
FLOOR = (1.0 / 255.0) ** 2    # an 8-bit grey step, squared: below it a window counts as flat
SHRINK = 0.1                  # weight of the covariance averaged over positions
RIDGE = 1e-3                  # added to every variance: no feature is trusted beyond this


def windows_for(side: int) -> list[tuple[int, int]]:
    """(window, stride) of the two scales for images of this side: an eighth and a quarter of it,
    each moved by half its width."""
    fine = max(2, round(side / 8))
    coarse = max(3, round(side / 4))
    return [(fine, max(1, fine // 2)), (coarse, max(1, coarse // 2))]


def _gradient_energy(plane: Tensor) -> Tensor:
    dx = F.pad(plane[:, :, :, 1:] - plane[:, :, :, :-1], [0, 1, 0, 0])
    dy = F.pad(plane[:, :, 1:, :] - plane[:, :, :-1, :], [0, 0, 0, 1])
    return dx * dx + dy * dy


def _laplacian_energy(plane: Tensor) -> Tensor:
    padded = F.pad(plane, [1, 1, 1, 1], mode="replicate")
    centre = padded[:, :, 1:-1, 1:-1]
    lap = (padded[:, :, :-2, 1:-1] + padded[:, :, 2:, 1:-1] + padded[:, :, 1:-1, :-2]
           + padded[:, :, 1:-1, 2:] - 4.0 * centre)
    return lap * lap


class LocalDensity(nn.Module):
    __jit_unused_properties__ = ["fitted"]

    def __init__(self, window: int, stride: int) -> None:
        super().__init__()
        self.window = window
        self.stride = stride
        self.floor = FLOOR             # an attribute: TorchScript does not read float globals
        self.register_buffer("mean", torch.zeros(0, FEATURES))                 # (L, F) once fitted
        self.register_buffer("precision", torch.zeros(0, FEATURES, FEATURES))  # (L, F, F)

    def statistics(self, x: Tensor, recon: Tensor) -> Tensor:
        """The eleven statistics of every window, (B, L, F)."""
        x = x.mean(1, keepdim=True)
        r = recon.mean(1, keepdim=True)
        e = x - r
        planes = torch.cat([x, x * x, r, r * r, e, e * e, _gradient_energy(x), _gradient_energy(r),
                            _laplacian_energy(x), _laplacian_energy(r), _gradient_energy(e)], 1)
        p = F.avg_pool2d(planes, self.window, self.stride).flatten(2)                  # (B, 11, L)
        var_x = (p[:, 1] - p[:, 0] * p[:, 0]).clamp(min=0.0)
        var_r = (p[:, 3] - p[:, 2] * p[:, 2]).clamp(min=0.0)
        energies = torch.stack([var_x, var_r, p[:, 5], p[:, 6], p[:, 7], p[:, 8], p[:, 9], p[:, 10]], 2)
        logs = torch.log(energies + self.floor)
        return torch.cat([p[:, 0].unsqueeze(2), p[:, 2].unsqueeze(2), logs[:, :, 0:2], p[:, 4].unsqueeze(2),
                          logs[:, :, 2:]], 2)

    def forward(self, x: Tensor, recon: Tensor) -> Tensor:
        """Squared Mahalanobis distance of every window from normal, (B, L)."""
        if self.mean.shape[0] == 0:
            raise RuntimeError("the local statistics are not fitted: recalibrate the artifact")
        centred = (self.statistics(x, recon) - self.mean).unsqueeze(2)                 # (B, L, 1, F)
        return (torch.matmul(centred, self.precision) * centred).sum(3).squeeze(2)

    def spread(self, distances: Tensor, height: int, width: int) -> Tensor:
        """Window distances (B, L) as a map (B, H, W): each pixel the mean distance of the windows
        that cover it (pixels past the last window take the nearest row or column)."""
        rows = (height - self.window) // self.stride + 1
        grid = distances.view(-1, 1, rows, distances.shape[1] // rows)
        kernel = torch.ones(1, 1, self.window, self.window, dtype=grid.dtype)
        total = transposed_conv_by_fold(grid, kernel, self.stride)
        covering = transposed_conv_by_fold(torch.ones_like(grid[:1]), kernel, self.stride)    # the same for every image
        spread = total / covering
        missing = [0, width - spread.shape[3], 0, height - spread.shape[2]]
        return F.pad(spread, missing, mode="replicate").squeeze(1)

    @torch.jit.unused
    def fit(self, statistics: Tensor) -> None:
        """Fill the Gaussians from the statistics (N, L, F) of normal images."""
        s = statistics.double()
        mean = s.mean(0)                                                              # (L, F)
        centred = (s - mean).transpose(0, 1)                                          # (L, N, F)
        cov = centred.transpose(1, 2) @ centred / max(1, s.shape[0] - 1)
        cov = (1 - SHRINK) * cov + SHRINK * cov.mean(0, keepdim=True)
        cov = cov + RIDGE * torch.eye(FEATURES, dtype=cov.dtype)
        self.mean = mean.float()
        self.precision = torch.linalg.inv(cov).float()

    @property
    def fitted(self) -> bool:
        return self.mean.shape[0] > 0
