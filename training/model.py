"""Variational autoencoders for images (Kingma & Welling, 2014, "Auto-Encoding Variational Bayes").

Two encoders/decoders share one interface, so training, scoring and export never ask which:
- `MLPVAE`: the seed's network, C*H*W -> hidden (ReLU) -> mu, log sigma^2 -> hidden (ReLU) -> C*H*W,
  by default 64 -> 16 -> 2 -> 16 -> 64 on 8x8 digits, with the seed's He initialisation;
- `ConvVAE`: stride-2 convolution stages down to a small feature map, a fully connected bottleneck,
  and the mirror image back up, for 28x28 and larger images, grayscale or RGB.

The decoder returns `logits`, the parameter of the likelihood p(x | z) per pixel:
- bernoulli (the seed's binary cross-entropy): p(x | z) = Bernoulli(sigmoid(logits));
- gaussian: N(sigmoid(logits), sigma^2) with one learned sigma per channel (a "calibrated decoder",
  Rybkin et al., 2021), so the reconstruction and KL terms find their own balance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LOG_2PI = math.log(2 * math.pi)
MIN_LOG_SIGMA = -6.0   # keeps the Gaussian likelihood from collapsing onto flat pixels


@dataclass(frozen=True)
class VAEConfig:
    arch: str                        # "mlp" or "conv"
    channels: int                    # C of the input images
    height: int                      # H
    width: int                       # W
    latent_dim: int                  # d, the size of z
    hidden: tuple[int, ...]          # mlp: the hidden widths; conv: the fully connected width(s)
    conv_channels: tuple[int, ...]   # conv: one width per stride-2 stage (ignored by the mlp)
    likelihood: str                  # "bernoulli" or "gaussian"

    @property
    def pixels(self) -> int:
        return self.channels * self.height * self.width


class VAE(nn.Module):
    """The shared half: likelihood, reparameterisation, and the loss terms per image."""

    __jit_ignored_attributes__ = ["config"]   # TorchScript needs only the plain fields below

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        assert config.likelihood in ("bernoulli", "gaussian"), f"unknown likelihood {config.likelihood}"
        self.config = config
        self.likelihood = config.likelihood
        self.image_shape = (config.channels, config.height, config.width)
        self.min_log_sigma = MIN_LOG_SIGMA    # attributes, not globals: TorchScript reads these
        self.log_2pi = LOG_2PI
        # log sigma per channel; unused (but harmless) for the bernoulli likelihood
        self.log_sigma = nn.Parameter(torch.full((config.channels,), -2.0),
                                      requires_grad=config.likelihood == "gaussian")

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def decode_logits(self, z: Tensor) -> Tensor:
        raise NotImplementedError

    def reparameterize(self, mu: Tensor, log_var: Tensor, eps: Tensor) -> Tensor:
        return mu + eps * torch.exp(0.5 * log_var)          # z = mu + eps * sigma

    def mean(self, logits: Tensor) -> Tensor:
        """E[x | z], the image the decoder expects, in [0, 1]."""
        return torch.sigmoid(logits)

    def pixel_nll(self, x: Tensor, logits: Tensor) -> Tensor:
        """-log p(x | z) per pixel, (B, C, H, W), in nats."""
        if self.likelihood == "bernoulli":
            return F.binary_cross_entropy_with_logits(logits, x, reduction="none")
        log_sigma = self.log_sigma.clamp(min=self.min_log_sigma).view(1, -1, 1, 1)
        return 0.5 * ((x - torch.sigmoid(logits)) * torch.exp(-log_sigma)) ** 2 + log_sigma + 0.5 * self.log_2pi

    def kl(self, mu: Tensor, log_var: Tensor) -> Tensor:
        """KL(q(z | x) || N(0, I)) per image, closed form (Kingma & Welling, appendix B)."""
        return -0.5 * torch.sum(1 + log_var - mu.pow(2) - log_var.exp(), dim=1)

    def forward(self, x: Tensor, eps: Tensor, target: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """One-sample loss terms per image: reconstruction -log p(target | z) with z drawn from
        q(z | x), and KL, each (B,). The target is x itself unless given (a denoising step)."""
        mu, log_var = self.encode(x)
        logits = self.decode_logits(self.reparameterize(mu, log_var, eps))
        rec = self.pixel_nll(x if target is None else target, logits).flatten(1).sum(1)
        return rec, self.kl(mu, log_var)


class MLPVAE(VAE):
    def __init__(self, config: VAEConfig) -> None:
        super().__init__(config)
        widths = [config.pixels, *config.hidden]
        self.encoder = nn.Sequential(*_dense_stack(widths))
        self.to_params = nn.Linear(widths[-1], 2 * config.latent_dim)      # -> (mu, log_var)
        rev = [config.latent_dim, *reversed(config.hidden)]
        self.decoder = nn.Sequential(*_dense_stack(rev), nn.Linear(rev[-1], config.pixels))
        self.init_weights()

    def init_weights(self) -> None:
        """The seed's: He normal for the ReLU layers, N(0, 1/fan_in) for the heads, zero biases."""
        relu_inputs = [m for m in self.encoder if isinstance(m, nn.Linear)]
        relu_inputs += [m for m in self.decoder[:-1] if isinstance(m, nn.Linear)]
        for layer in [*relu_inputs, self.to_params, self.decoder[-1]]:
            gain = 2.0 if layer in relu_inputs else 1.0
            nn.init.normal_(layer.weight, std=math.sqrt(gain / layer.in_features))
            nn.init.zeros_(layer.bias)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        params = self.to_params(self.encoder(x.flatten(1)))                # (B, 2d)
        mu, log_var = params.chunk(2, dim=1)
        return mu, log_var

    def decode_logits(self, z: Tensor) -> Tensor:
        c, h, w = self.image_shape
        return self.decoder(z).view(-1, c, h, w)                            # (B, C, H, W)


class ConvVAE(VAE):
    def __init__(self, config: VAEConfig) -> None:
        super().__init__(config)
        stages = len(config.conv_channels)
        assert stages >= 1, "the conv VAE needs at least one stage"
        assert config.height % 2**stages == 0 and config.width % 2**stages == 0, (
            f"{config.height}x{config.width} is not divisible by 2^{stages}")
        self.feature_shape = (config.conv_channels[-1], config.height >> stages, config.width >> stages)
        features = math.prod(self.feature_shape)
        widths = [config.channels, *config.conv_channels]
        self.encoder = nn.Sequential(
            *[_down_stage(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True)],  # (B, c_k, H/2^k, W/2^k)
            nn.Flatten(),
            *_dense_stack([features, *config.hidden]),
        )
        self.to_params = nn.Linear(config.hidden[-1], 2 * config.latent_dim)
        self.decoder = nn.Sequential(
            *_dense_stack([config.latent_dim, *reversed(config.hidden), features]),
            nn.Unflatten(1, self.feature_shape),
            *[_up_stage(a, b) for a, b in zip(widths[:1:-1], widths[-2:0:-1], strict=True)],
            ToImage(widths[1], config.channels),                                     # -> logits
        )

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mu, log_var = self.to_params(self.encoder(x)).chunk(2, dim=1)       # (B, d) each
        return mu, log_var

    def decode_logits(self, z: Tensor) -> Tensor:
        return self.decoder(z)                                              # (B, C, H, W)


def _dense_stack(widths: list[int]) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:], strict=True):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return layers


def _down_stage(c_in: int, c_out: int) -> nn.Sequential:
    """A 4x4 stride-2 conv: halves H and W exactly. Strided convs only, no full-resolution
    3x3 layers: those cost most of the compute on a CPU and helped little here."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), nn.SiLU())


def _up_stage(c_in: int, c_out: int) -> nn.Sequential:
    """A 4x4 stride-2 transposed conv: doubles H and W exactly."""
    return nn.Sequential(nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1), nn.SiLU())


class ToImage(nn.ConvTranspose2d):
    """The last 4x4 stride-2 transposed conv, onto the image's 1 or 3 channels, computed by
    `transposed_conv_by_fold`: the parameters and the result are nn.ConvTranspose2d's (to float
    rounding), without oneDNN's slow kernel for so few output channels."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(c_in, c_out, 4, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        bias = self.bias
        assert bias is not None                      # always built with one; TorchScript needs telling
        return transposed_conv_by_fold(x, self.weight, 2, 1) + bias.view(1, -1, 1, 1)


def transposed_conv_by_fold(x: Tensor, weight: Tensor, stride: int, padding: int = 0) -> Tensor:
    """`F.conv_transpose2d(x, weight, stride=stride, padding=padding)`, no bias, as one matrix
    product and a fold (col2im). oneDNN's kernel is slow onto few output channels: for 32 -> 1
    channels at 14x14 -> 28x28, 153 against 26 µs for one image and 3.2 against 0.6 ms for 64
    (torch 2.13, one thread); onto many channels it is the faster one."""
    b, c_in, h, w = x.shape
    k_h, k_w = weight.shape[2], weight.shape[3]
    columns = torch.matmul(weight.reshape(c_in, -1).t(), x.reshape(b, c_in, h * w))      # (B, C_out*k*k, H*W)
    size = [(h - 1) * stride - 2 * padding + k_h, (w - 1) * stride - 2 * padding + k_w]
    return F.fold(columns, size, [k_h, k_w], padding=padding, stride=stride)


def build_vae(config: VAEConfig) -> VAE:
    if config.arch == "mlp":
        return MLPVAE(config)
    if config.arch == "conv":
        return ConvVAE(config)
    raise ValueError(f"unknown architecture {config.arch!r}: expected mlp or conv")
