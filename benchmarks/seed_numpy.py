"""The seed's VAE, re-implemented in NumPy as the baseline for the training benchmark.

Same algorithm as the seed document (see ../shared/SEED.md): 64 -> 16 (ReLU, He init) -> mu,
log sigma^2 -> 16 (ReLU) -> 64 (sigmoid), summed binary cross-entropy plus KL, plain SGD on
gradients summed over the batch (eta = 0.001), batch 32, a fresh shuffle each epoch and the
trailing partial batch dropped. Written here from the maths, not copied.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np


def _dense(rng: np.random.Generator, n_in: int, n_out: int, scale: float) -> list[np.ndarray]:
    return [rng.standard_normal((n_in, n_out)) * scale, np.zeros(n_out)]


@dataclass
class SeedVAE:
    n_in: int = 64
    n_hidden: int = 16
    n_latent: int = 2
    seed: int = 0
    params: dict[str, list[np.ndarray]] = field(init=False)

    def __post_init__(self) -> None:
        rng = np.random.default_rng(self.seed)
        self.rng = rng
        he, h = np.sqrt(2 / self.n_in), 1 / np.sqrt(self.n_hidden)
        self.params = {
            "enc": _dense(rng, self.n_in, self.n_hidden, he),
            "mu": _dense(rng, self.n_hidden, self.n_latent, h),
            "log_var": _dense(rng, self.n_hidden, self.n_latent, h),
            "dec": _dense(rng, self.n_latent, self.n_hidden, np.sqrt(2 / self.n_latent)),
            "out": _dense(rng, self.n_hidden, self.n_in, h),
        }

    def forward(self, x: np.ndarray, eps: np.ndarray) -> dict[str, np.ndarray]:
        p = self.params
        u_enc = x @ p["enc"][0] + p["enc"][1]
        h_enc = np.maximum(u_enc, 0)
        mu = h_enc @ p["mu"][0] + p["mu"][1]
        log_var = h_enc @ p["log_var"][0] + p["log_var"][1]
        z = mu + eps * np.exp(log_var / 2)
        u_dec = z @ p["dec"][0] + p["dec"][1]
        h_dec = np.maximum(u_dec, 0)
        y = 1 / (1 + np.exp(-(h_dec @ p["out"][0] + p["out"][1])))
        return {"x": x, "u_enc": u_enc, "h_enc": h_enc, "mu": mu, "log_var": log_var, "eps": eps, "z": z,
                "u_dec": u_dec, "h_dec": h_dec, "y": y}

    def gradients(self, f: dict[str, np.ndarray]) -> dict[str, list[np.ndarray]]:
        """Gradients of the batch-summed BCE + KL, as the seed's backward pass computes them."""
        p = self.params
        d_out = f["y"] - f["x"]
        d_h_dec = (d_out @ p["out"][0].T) * (f["u_dec"] > 0)
        d_z = d_h_dec @ p["dec"][0].T
        d_mu = d_z + f["mu"]
        d_log_var = d_z * f["eps"] / 2 * np.exp(f["log_var"] / 2) - 0.5 * (1 - np.exp(f["log_var"]))
        d_h_enc = (d_mu @ p["mu"][0].T + d_log_var @ p["log_var"][0].T) * (f["u_enc"] > 0)
        grad = {}
        for name, inp, delta in (("out", f["h_dec"], d_out), ("dec", f["z"], d_h_dec),
                                 ("mu", f["h_enc"], d_mu), ("log_var", f["h_enc"], d_log_var),
                                 ("enc", f["x"], d_h_enc)):
            grad[name] = [inp.T @ delta, delta.sum(axis=0)]
        return grad

    def step(self, x: np.ndarray, eta: float) -> None:
        f = self.forward(x, self.rng.standard_normal((len(x), self.n_latent)))
        for name, (g_w, g_b) in self.gradients(f).items():
            self.params[name][0] -= eta * g_w
            self.params[name][1] -= eta * g_b

    def losses(self, x: np.ndarray) -> tuple[float, float]:
        """Mean per-image reconstruction BCE and KL (the usual KL: half the seed's printed reg)."""
        f = self.forward(x, self.rng.standard_normal((len(x), self.n_latent)))
        y = np.clip(f["y"], 1e-7, 1 - 1e-7)
        rec = -np.sum(x * np.log(y) + (1 - x) * np.log(1 - y)) / len(x)
        kl = -0.5 * np.sum(1 + f["log_var"] - f["mu"] ** 2 - np.exp(f["log_var"])) / len(x)
        return float(rec), float(kl)


def train_seed(x_train: np.ndarray, epochs: int = 201, batch_size: int = 32, eta: float = 1e-3,
               seed: int = 0) -> tuple[SeedVAE, float]:
    """Train like the seed; returns the model and the wall time of the optimisation alone."""
    model = SeedVAE(n_in=x_train.shape[1], seed=seed)
    n_batches = len(x_train) // batch_size
    start = time.perf_counter()
    for _ in range(epochs):
        order = model.rng.permutation(len(x_train))
        for j in range(n_batches):
            model.step(x_train[order[j * batch_size:(j + 1) * batch_size]], eta)
    return model, time.perf_counter() - start


if __name__ == "__main__":
    from sklearn.datasets import load_digits

    x = load_digits().data / 16
    vae, seconds = train_seed(x)
    rec, kl = vae.losses(x)
    print(f"{seconds:.2f} s, rec {rec:.2f} kl {kl:.2f} total {rec + kl:.2f} (seed's reg = {2 * kl:.2f})")
