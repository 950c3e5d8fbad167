"""What an artifact holds and the service calls: the trained VAE plus its anomaly scores.

`ServableVAE` is written to be compiled by `torch.jit.script`, so the service runs the very code
that scored the calibration images. Every method takes images (B, C, H, W) in [0, 1].

Scores (higher = more anomalous, nats per image):
- `recon`: -log p(x | z = mu), the reconstruction term at the latent mean;
- `elbo`:  -ELBO = E_q[-log p(x | z)] + KL(q(z | x) || p(z)), the expectation over K samples;
- `iwae`:  -log p(x) estimated with K importance samples (Burda et al., 2016), a tighter bound;
- `excess`: the anomaly map summed: each pixel's -log p(x | z = mu) above the least it could be for
           that pixel's value. For the Bernoulli likelihood the floor is the pixel's binary entropy,
           so this is the reconstruction error corrected for the input's own complexity (in the
           spirit of Serra et al., 2020): a plain image no longer scores as more normal;
- `peak`:  the mean of the top `peak_share` of the anomaly map after a `peak_window` box average:
           a small defect counts in full instead of being diluted by the rest of the image, and the
           box average keeps isolated noisy pixels of a clean image from setting the score;
- `local`: the mean of the largest `LOCAL_SHARE` of the window distances of `training.local_density`, a
           Gaussian over local statistics of the input, reconstruction and residual at two window
           sizes: it rises for detail that is missing (blur, flattened material), not only added;
- `combined`: peak + local, each first standardised on held-out normal images ((s - median) /
           (99th percentile - median)), so each counts equally at its own 1% tail;
- `learned`: the mean of the top `peak_share` of the defect segmenter's probability map
           (`training.segmenter`, trained on synthetic corruptions) after the `peak_window` box average;
- `fused`: peak + local + learned, each standardised on held-out normal images as for `combined`.
`recon`, `excess`, `peak`, `local`, `combined`, `learned` and `fused` take one decoder pass; `elbo` and
`iwae` take K + 1. `local` and `combined` need statistics fitted on normal images (`fit_local`),
`learned` a trained segmenter (`fit_segmenter`), `fused` both; export fits them.
The K latent samples use one fixed noise draw stored in the module (common random numbers), so a
score is deterministic and does not depend on which other images share the batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .local_density import FEATURES, LocalDensity, windows_for
from .model import VAE
from .segmenter import LEVELS, WIDTH, build_segmenter, train_segmenter

SCORE_KINDS = ("recon", "elbo", "iwae", "excess", "peak", "local", "combined", "learned", "fused")
SCORE_UNITS = {"recon": "nats per image", "elbo": "nats per image", "iwae": "nats per image",
               "excess": "nats per image", "peak": "nats per pixel",
               "local": "squared Mahalanobis distance", "combined": "standardised units",
               "learned": "defect probability", "fused": "standardised units"}
LOCAL_KINDS = ("local", "combined", "fused")   # need `fit_local` first
LEARNED_KINDS = ("learned", "fused")           # need `fit_segmenter` first
LOCAL_SHARE = 0.1        # of the windows, averaged: about a defect's area, so its evidence adds up
PEAK_WINDOW = 5          # pixels; odd, so the box is centred
PEAK_SHARE = 0.05        # of the pixels


def box_average(maps: Tensor, window: int) -> Tensor:
    """Maps (B, H, W) averaged over a `window`-wide box around each pixel (cut at the borders)."""
    return F.avg_pool2d(maps.unsqueeze(1), window, 1, window // 2, count_include_pad=False).squeeze(1)


def top_mean(values: Tensor, share: float) -> Tensor:
    """The mean of the highest `share` of each image's values (B,)."""
    flat = values.flatten(1)
    k = max(1, int(round(share * flat.shape[1])))
    return flat.topk(k, dim=1).values.mean(1)


class ServableVAE(nn.Module):
    __jit_unused_properties__ = ["local_fitted", "segmenter_trained"]

    def __init__(self, vae: VAE, score_kind: str = "elbo", score_samples: int = 16, seed: int = 0,
                 peak_window: int = PEAK_WINDOW, peak_share: float = PEAK_SHARE,
                 segmenter_width: int = WIDTH, segmenter_levels: int = LEVELS) -> None:
        super().__init__()
        assert score_kind in SCORE_KINDS, f"score kind must be one of {SCORE_KINDS}, got {score_kind!r}"
        assert peak_window >= 1 and peak_window % 2 == 1, "peak_window must be odd and positive"
        assert 0.0 < peak_share <= 1.0, "peak_share must be in (0, 1]"
        self.vae = vae
        self.score_kind = score_kind
        self.peak_window = peak_window
        self.peak_share = peak_share
        noise = torch.randn(score_samples, vae.config.latent_dim, generator=torch.Generator().manual_seed(seed))
        self.register_buffer("score_eps", noise)                           # (K, d)
        side = min(vae.config.height, vae.config.width)
        self.local_share = LOCAL_SHARE
        self.local_expected = float(FEATURES)   # a normal window's mean squared distance: one per statistic
        self.local = nn.ModuleList([LocalDensity(window, stride) for window, stride in windows_for(side)])
        # how `combined` standardises (peak, local): median and 99th percentile minus median
        self.register_buffer("combined_center", torch.zeros(2))
        self.register_buffer("combined_scale", torch.ones(2))
        self.segmenter = build_segmenter(vae.config.channels, segmenter_width, segmenter_levels)
        self.register_buffer("segmenter_steps", torch.zeros(()))          # 0 until trained
        # how `fused` standardises (peak, local, learned)
        self.register_buffer("fused_center", torch.zeros(3))
        self.register_buffer("fused_scale", torch.ones(3))

    def forward(self, x: Tensor) -> Tensor:
        """The reconstruction: the decoder's mean image at z = mu."""
        mu, _ = self.vae.encode(x)
        return self.vae.mean(self.vae.decode_logits(mu))

    @torch.jit.export
    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """mu and log sigma^2 of q(z | x), (B, d) each."""
        return self.vae.encode(x)

    @torch.jit.export
    def decode(self, z: Tensor) -> Tensor:
        """Images (B, C, H, W) in [0, 1] for latents z (B, d)."""
        return self.vae.mean(self.vae.decode_logits(z))

    @torch.jit.export
    def reconstruction_error(self, x: Tensor) -> Tensor:
        """-log p(x | z = mu) per image (B,): the training log's reconstruction term."""
        mu, _ = self.vae.encode(x)
        return self.vae.pixel_nll(x, self.vae.decode_logits(mu)).flatten(1).sum(1)

    @torch.jit.export
    def score(self, x: Tensor) -> Tensor:
        """The artifact's default anomaly score per image (B,)."""
        return self.score_by(x, self.score_kind)

    @torch.jit.export
    def score_by(self, x: Tensor, kind: str) -> Tensor:
        if kind == "recon":
            return self.reconstruction_error(x)
        if kind == "excess":
            return self.excess_map(x).flatten(1).sum(1)
        if kind == "peak":
            return self.peak_score(self.excess_map(x))
        if kind == "local" or kind == "combined":
            peak, local = self._peak_and_local(x)
            return local if kind == "local" else self._combine(peak, local)
        if kind == "learned":
            return top_mean(self._defect_box(x, self.forward(x)), self.peak_share)
        if kind == "fused":
            return self._fused(x, False)[0]
        mu, log_var = self.vae.encode(x)
        log_px_z, log_pz, log_qz = self._sample_terms(x, mu, log_var)      # (B, K) each
        if kind == "elbo":
            return -log_px_z.mean(1) + self.vae.kl(mu, log_var)
        if kind == "iwae":
            k = log_px_z.shape[1]
            return -(torch.logsumexp(log_px_z + log_pz - log_qz, dim=1) - math.log(k))
        raise ValueError("unknown score kind " + kind + ": expected recon, elbo, iwae, excess, peak, local, "
                         "combined, learned or fused")

    @torch.jit.export
    def anomaly_map(self, x: Tensor) -> Tensor:
        """Per-pixel anomaly (B, H, W) for the default kind: the excess map, or for `local` and
        `combined` the map of what those scores read (`local_map`), for `learned` the box-averaged
        defect probability, for `fused` the sum of what its three parts read."""
        if self.score_kind == "local" or self.score_kind == "combined":
            return self.local_map(x)
        if self.score_kind == "learned":
            return self._defect_box(x, self.forward(x))
        if self.score_kind == "fused":
            return self._fused(x, True)[1]
        return self.excess_map(x)

    @torch.jit.export
    def excess_map(self, x: Tensor) -> Tensor:
        """The pixel's -log p(x | z = mu) above the least it could be for that pixel value, summed
        over channels, (B, H, W). Zero where the reconstruction is exact."""
        mu, _ = self.vae.encode(x)
        return self._excess_map(x, self.vae.decode_logits(mu))

    @torch.jit.export
    def local_map(self, x: Tensor) -> Tensor:
        """What `combined` reads, per pixel (B, H, W): the box-averaged excess map divided by the
        spread of peak (its 99th percentile minus median), plus each window's distance above its
        expectation (one per statistic) divided by the spread of local, shared among the pixels the
        window covers. `local` keeps only the second term. Zero where neither sees anything unusual."""
        logits, _, windows = self._local_pass(x)
        local = self._local_spread(windows, x.shape[2], x.shape[3]) / self.combined_scale[1]
        if self.score_kind == "local":
            return local
        return self._box(self._excess_map(x, logits)) / self.combined_scale[0] + local

    @torch.jit.export
    def score_with_map(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """`score(x)` and `anomaly_map(x)` together, equal to calling both, but from one pass of the
        encoder and decoder (and of the window statistics) where the default kind reads its map."""
        kind = self.score_kind
        if kind == "excess" or kind == "peak":
            excess = self.excess_map(x)
            return (excess.flatten(1).sum(1) if kind == "excess" else self.peak_score(excess)), excess
        if kind == "local" or kind == "combined":
            logits, _, windows = self._local_pass(x)
            local_score = self._local_score(windows)
            local = self._local_spread(windows, x.shape[2], x.shape[3]) / self.combined_scale[1]
            if kind == "local":
                return local_score, local
            box = self._box(self._excess_map(x, logits))
            score = self._combine(top_mean(box, self.peak_share), local_score)
            return score, box / self.combined_scale[0] + local
        if kind == "learned":
            defects = self._defect_box(x, self.forward(x))
            return top_mean(defects, self.peak_share), defects
        if kind == "fused":
            return self._fused(x, True)
        return self.score(x), self.anomaly_map(x)       # sampled kinds: their map is another pass

    def _excess_map(self, x: Tensor, logits: Tensor) -> Tensor:
        excess = self.vae.pixel_nll(x, logits) - self.vae.pixel_nll(x, self._best_logits(x))
        return excess.clamp(min=0.0).sum(1)

    def peak_score(self, anomaly_map: Tensor) -> Tensor:
        """The mean of the highest `peak_share` of the box-averaged map, per image (B,)."""
        return top_mean(self._box(anomaly_map), self.peak_share)

    def _box(self, anomaly_map: Tensor) -> Tensor:
        """The map (B, H, W) averaged over a `peak_window` box around each pixel."""
        return box_average(anomaly_map, self.peak_window)

    def _combine(self, peak: Tensor, local: Tensor) -> Tensor:
        """`combined`: peak and local, each standardised on held-out images, added."""
        return ((torch.stack([peak, local], 1) - self.combined_center) / self.combined_scale).sum(1)

    def _local_pass(self, x: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
        """The decoder's logits at z = mu, the reconstruction they give, and every window's distance
        from normal (B, L) per scale."""
        mu, _ = self.vae.encode(x)
        logits = self.vae.decode_logits(mu)
        recon = self.vae.mean(logits)
        return logits, recon, [density(x, recon) for density in self.local]

    def _local_score(self, windows: list[Tensor]) -> Tensor:
        """`local`: the mean of the farthest `local_share` of the windows, all scales together (B,)."""
        return top_mean(torch.cat(windows, 1), self.local_share)

    def _local_spread(self, windows: list[Tensor], height: int, width: int) -> Tensor:
        """What `local` reads, as a map (B, H, W): window distances above expectation, spread over
        their pixels (callers divide by the spread of their own standardisation)."""
        per_scale = [density.spread(windows[i], height, width) for i, density in enumerate(self.local)]
        spread = torch.stack(per_scale).mean(0)
        return (spread - self.local_expected).clamp(min=0.0)

    def _defect_box(self, x: Tensor, recon: Tensor) -> Tensor:
        """The segmenter's defect probability per pixel (B, H, W), box-averaged as `peak` is."""
        if float(self.segmenter_steps) == 0.0:
            raise RuntimeError("the defect segmenter is not trained: recalibrate the artifact with "
                               "--score learned or fused")
        return self._box(torch.sigmoid(self.segmenter(x, recon)).squeeze(1))

    def _fused(self, x: Tensor, with_map: bool) -> tuple[Tensor, Tensor]:
        """`fused` (B,) and, if asked, its map (B, H, W) (else an empty tensor), from one decoder pass:
        each part standardised, the map each part's map divided by that part's spread."""
        logits, recon, windows = self._local_pass(x)
        excess, defects = self._box(self._excess_map(x, logits)), self._defect_box(x, recon)
        parts = torch.stack([top_mean(excess, self.peak_share), self._local_score(windows),
                             top_mean(defects, self.peak_share)], 1)
        score = ((parts - self.fused_center) / self.fused_scale).sum(1)
        if not with_map:
            return score, torch.empty(0)
        local = self._local_spread(windows, x.shape[2], x.shape[3])
        scale = self.fused_scale
        return score, excess / scale[0] + local / scale[1] + defects / scale[2]

    def _peak_and_local(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The peak and local scores (B,) each, from one decoder pass."""
        logits, _, windows = self._local_pass(x)
        return self.peak_score(self._excess_map(x, logits)), self._local_score(windows)

    @torch.jit.unused
    def fit_local(self, normal: Tensor, held_out: Tensor, batch_size: int = 256) -> None:
        """Fit the local statistics on normal images, then standardise `combined` on held-out ones."""
        with torch.no_grad():
            batches = [normal[i:i + batch_size] for i in range(0, len(normal), batch_size)]
            recons = [self(batch) for batch in batches]
            for density in self.local:     # in batches: the per-pixel planes of 10,000 images would not fit
                density.fit(torch.cat([density.statistics(b, r) for b, r in zip(batches, recons, strict=True)]))
        self.standardise(held_out, batch_size)

    @torch.jit.unused
    def fit_segmenter(self, normal: Tensor, held_out: Tensor, steps: int, seed: int = 0,
                      progress: bool = True) -> list[float]:
        """Train the defect segmenter on corrupted copies of normal images, then standardise `fused`
        on held-out ones. Returns the training loss per step."""
        losses = train_segmenter(self.segmenter, self.forward, normal, steps, seed=seed, progress=progress)
        self.segmenter_steps = torch.tensor(float(steps))
        if self.local_fitted:
            self.standardise(held_out)
        return losses

    @torch.jit.unused
    def standardise(self, held_out: Tensor, batch_size: int = 256) -> None:
        """The centre (median) and spread (99th percentile minus median) of each part of `combined`
        and, once the segmenter is trained, of `fused`, on held-out normal images."""
        parts = []
        with torch.no_grad():
            for start in range(0, len(held_out), batch_size):
                x = held_out[start:start + batch_size]
                logits, recon, windows = self._local_pass(x)          # one decoder pass for all three parts
                peak, local = self.peak_score(self._excess_map(x, logits)), self._local_score(windows)
                learned = (top_mean(self._defect_box(x, recon), self.peak_share) if self.segmenter_trained
                           else torch.zeros_like(peak))
                parts.append(torch.stack([peak, local, learned], 1))
        values = torch.cat(parts).double()
        median, tail = values.quantile(0.5, dim=0), values.quantile(0.99, dim=0)
        scale = (tail - median).clamp(min=1e-6).float()
        self.combined_center, self.combined_scale = median[:2].float(), scale[:2]
        if self.segmenter_trained:
            self.fused_center, self.fused_scale = median.float(), scale

    @torch.jit.unused
    def load_trained(self, state: dict[str, Tensor]) -> None:
        """Load an artifact's state: its local statistics if it has them (sized by their fit), else
        these stay unfitted, as in an artifact exported before they existed."""
        own = self.state_dict()
        for name, value in state.items():
            if name in own and own[name].numel() == 0 and value.numel() > 0:
                owner, _, buffer = name.rpartition(".")
                self.get_submodule(owner).register_buffer(buffer, torch.empty_like(value))
        self.load_state_dict({**self.state_dict(), **state})

    @property
    def local_fitted(self) -> bool:
        return all(density.fitted for density in self.local)

    @property
    def segmenter_trained(self) -> bool:
        return float(self.segmenter_steps) > 0

    @torch.jit.unused
    def available_kinds(self) -> list[str]:
        """The kinds this module can compute: all of them once the local statistics are fitted and
        the segmenter is trained."""
        return [k for k in SCORE_KINDS if (self.local_fitted or k not in LOCAL_KINDS)
                and (self.segmenter_trained or k not in LEARNED_KINDS)]

    def _best_logits(self, x: Tensor) -> Tensor:
        """Logits whose mean is x itself: the per-pixel minimum of the reconstruction loss."""
        p = x.clamp(1e-6, 1 - 1e-6)
        return torch.log(p) - torch.log1p(-p)

    def _sample_terms(self, x: Tensor, mu: Tensor, log_var: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """log p(x | z_k), log p(z_k) and log q(z_k | x) for the K fixed noise draws, (B, K) each."""
        b, k, d = mu.shape[0], self.score_eps.shape[0], mu.shape[1]
        eps = self.score_eps.unsqueeze(0)                                   # (1, K, d)
        z = mu.unsqueeze(1) + eps * torch.exp(0.5 * log_var).unsqueeze(1)   # (B, K, d)
        logits = self.vae.decode_logits(z.reshape(b * k, d))                # (B*K, C, H, W)
        x_k = x.unsqueeze(1).expand(b, k, x.shape[1], x.shape[2], x.shape[3]).reshape(logits.shape)
        log_px_z = -self.vae.pixel_nll(x_k, logits).flatten(1).sum(1).view(b, k)
        log_pz = -0.5 * (z.pow(2) + self.vae.log_2pi).sum(2)
        log_qz = -0.5 * (eps.pow(2) + self.vae.log_2pi + log_var.unsqueeze(1)).sum(2)
        return log_px_z, log_pz, log_qz
