"""Both architectures and both likelihoods: shapes, loss terms as the maths reads, gradients."""

from __future__ import annotations

import math

import pytest
import torch

from training.config import TrainConfig, conv_stages, resolve
from training.model import MLPVAE, ConvVAE, ToImage, VAEConfig, build_vae

SEED_MLP = VAEConfig("mlp", 1, 8, 8, 2, (16,), (), "bernoulli")


def test_seed_mlp_is_64_16_2() -> None:
    vae = build_vae(SEED_MLP)
    assert isinstance(vae, MLPVAE)
    shapes = [tuple(p.shape) for name, p in vae.named_parameters() if name.endswith("weight")]
    assert shapes == [(16, 64), (4, 16), (16, 2), (64, 16)]     # 64->16, 16->(mu, log_var), 2->16, 16->64


def test_auto_config_is_the_seed_for_8x8_and_conv_for_28x28() -> None:
    small = resolve(TrainConfig(), 8, 8)
    assert (small.arch, small.hidden, small.latent_dim, small.epochs, small.batch_size) == ("mlp", (16,), 2, 201, 32)
    large = resolve(TrainConfig(), 28, 28)
    assert (large.arch, large.conv_channels, large.latent_dim) == ("conv", (32, 64), 16)
    assert conv_stages(64, 64) == 4 and conv_stages(28, 28) == 2 and conv_stages(30, 30) == 1


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (1, 64, 48)])
def test_conv_vae_shapes_and_gradients(likelihood: str, shape: tuple[int, int, int]) -> None:
    c, h, w = shape
    config = VAEConfig("conv", c, h, w, 8, (64,), tuple(32 for _ in range(conv_stages(h, w))), likelihood)
    vae = build_vae(config)
    assert isinstance(vae, ConvVAE)
    x = torch.rand(3, c, h, w)
    mu, log_var = vae.encode(x)
    assert mu.shape == log_var.shape == (3, 8)
    assert vae.decode_logits(mu).shape == (3, c, h, w)
    rec, kl = vae(x, torch.randn(3, 8))
    assert rec.shape == kl.shape == (3,)
    (rec + kl).mean().backward()
    assert all(p.grad is not None for p in vae.parameters() if p.requires_grad)
    assert vae.log_sigma.requires_grad == (likelihood == "gaussian")


def test_bernoulli_loss_is_summed_bce_and_closed_form_kl() -> None:
    torch.manual_seed(0)
    vae = build_vae(SEED_MLP)
    x, eps = torch.rand(4, 1, 8, 8), torch.randn(4, 2)
    rec, kl = vae(x, eps)
    mu, log_var = vae.encode(x)
    y = torch.sigmoid(vae.decode_logits(mu + eps * torch.exp(0.5 * log_var)))
    expected_rec = -(x * torch.log(y) + (1 - x) * torch.log(1 - y)).flatten(1).sum(1)
    expected_kl = 0.5 * (mu**2 + log_var.exp() - 1 - log_var).sum(1)
    torch.testing.assert_close(rec, expected_rec, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(kl, expected_kl)


def test_gaussian_loss_is_the_normal_density() -> None:
    vae = build_vae(VAEConfig("mlp", 1, 8, 8, 2, (16,), (), "gaussian"))
    x, logits = torch.rand(2, 1, 8, 8), torch.randn(2, 1, 8, 8)
    sigma = math.exp(-2.0)
    expected = -torch.distributions.Normal(torch.sigmoid(logits), sigma).log_prob(x)
    torch.testing.assert_close(vae.pixel_nll(x, logits), expected, rtol=1e-5, atol=1e-5)


def test_seed_initialisation_scales() -> None:
    torch.manual_seed(0)
    vae = MLPVAE(VAEConfig("mlp", 1, 32, 32, 2, (512,), (), "bernoulli"))
    first = vae.encoder[0].weight
    assert abs(first.std().item() - math.sqrt(2 / 1024)) < 0.1 * math.sqrt(2 / 1024)    # He
    assert torch.count_nonzero(vae.encoder[0].bias) == 0


@pytest.mark.parametrize(("c_in", "c_out", "side"), [(32, 1, 14), (16, 3, 32)])
def test_to_image_is_the_transposed_conv_it_replaces(c_in: int, c_out: int, side: int) -> None:
    """Same output and gradients as nn.ConvTranspose2d with its parameters, to float rounding."""
    torch.manual_seed(0)
    layer = ToImage(c_in, c_out)
    x = torch.randn(3, c_in, side, side, requires_grad=True)
    ours = layer(x)
    reference = torch.nn.functional.conv_transpose2d(x, layer.weight, layer.bias, stride=2, padding=1)
    assert ours.shape == (3, c_out, 2 * side, 2 * side)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    for mine, theirs in zip(torch.autograd.grad(ours.square().sum(), (x, layer.weight, layer.bias)),
                            torch.autograd.grad(reference.square().sum(), (x, layer.weight, layer.bias)), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.jit.script(layer)(x), ours, rtol=0, atol=0)
