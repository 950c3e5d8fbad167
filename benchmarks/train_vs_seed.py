"""Training benchmark: our PyTorch trainer against the seed's NumPy VAE, side by side in one run.

Run from the repository root:  .venv/bin/python -m benchmarks.train_vs_seed [--quick] [--rounds 3] [--threads 1]

- Throughput of the optimisation loop alone (images/s): the seed (benchmarks/seed_numpy.py: SGD on
  batch-summed gradients) against ours (training.train.train_epoch with Adam), on the same digits
  split, widths, batch size and epochs. The machine is shared and noisy, so the contenders run
  interleaved, in alternating order over several rounds, and the report gives per-round figures
  and medians.
- The validation and test -ELBO each reaches, from one evaluator: the NumPy weights are copied into
  our MLPVAE and scored by training.train.evaluate and an importance-weighted bound.
- The same pair with a wider hidden layer, where per-operation overhead matters less.
- A few larger configurations trained end to end by training.train.train, against the seed's 25.4.

It writes benchmarks/results/train_vs_seed.md and .png (with --quick: train_vs_seed_quick.*).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from benchmarks.seed_numpy import SeedVAE
from training.config import TrainConfig
from training.data import Splits
from training.export import score_images
from training.model import MLPVAE, VAE, VAEConfig, build_vae
from training.scoring import ServableVAE
from training.train import (
    DECODES_PER_BATCH,
    IWAE_MAX_IMAGES,
    IWAE_SAMPLES,
    Distributed,
    evaluate,
    make_optimizer,
    prepare,
    train,
    train_epoch,
    vae_config_of,
)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SEED_ETA = 1e-3                  # the seed's SGD step, applied to gradients summed over the batch
SEED_REFERENCE_TEST_ELBO = 25.4  # nats per image: the seed architecture's test -ELBO on digits
CONVERSION_TOLERANCE = 1e-5      # NumPy (float64) forward against the converted float32 torch model
SINGLE = Distributed()           # one process
CONTENDER_LABELS = {
    "seed": "seed: NumPy, SGD",
    "ours": "ours: PyTorch train_epoch, fused Adam",
}
BETTER_CONFIGS: dict[str, dict[str, Any]] = {
    "64-16-2, batch 32 (seed architecture, TrainConfig defaults)": {},
    "64-128-8, batch 32": {"hidden": (128,), "latent_dim": 8, "epochs": 400, "patience": 30},
    "64-256-128-8, batch 64": {"hidden": (256, 128), "latent_dim": 8, "batch_size": 64, "epochs": 400,
                               "patience": 30},
    "64-256-128-16, batch 64": {"hidden": (256, 128), "latent_dim": 16, "batch_size": 64, "epochs": 400,
                                "patience": 30},
    "64-512-256-16, batch 32": {"hidden": (512, 256), "latent_dim": 16, "epochs": 400, "patience": 30},
}


def log(message: str) -> None:
    """Progress goes to stderr, so stdout holds only the final table."""
    print(message, file=sys.stderr, flush=True)


# ---- the shared data and settings ------------------------------------------------------------

@dataclass(frozen=True)
class Pair:
    """One architecture, 64 -> hidden -> latent, that every contender trains for the same epochs."""
    label: str
    hidden: int
    latent: int
    epochs: int


@dataclass
class Bench:
    config: TrainConfig        # TrainConfig's defaults resolved for 8x8 digits: what training runs
    splits: Splits
    train_x: np.ndarray        # (N, 64) float64, the seed's precision
    train_images: torch.Tensor
    val_images: torch.Tensor
    test_images: torch.Tensor

    @property
    def steps_per_epoch(self) -> int:
        return len(self.train_x) // self.config.batch_size        # both drop the partial batch

    def images_trained(self, pair: Pair) -> int:
        return pair.epochs * self.steps_per_epoch * self.config.batch_size

    def pair_config(self, pair: Pair) -> TrainConfig:
        return replace(self.config, hidden=(pair.hidden,), latent_dim=pair.latent, epochs=pair.epochs)

    def val_elbo(self, vae: VAE) -> float:
        return evaluate(vae, self.val_images, self.config.seed, SINGLE)["total"]


def load_bench() -> Bench:
    """prepare() is what train() runs first: digits / 16, the seeded split, the auto settings."""
    # quiet only drops the progress bar, which train_epoch hides anyway below 200 steps an epoch
    config, splits, _ = prepare(TrainConfig(data="digits", quiet=True))
    train_x = splits.train.images.reshape(len(splits.train), -1).astype(np.float64)
    tensors = (torch.as_tensor(s.images) for s in (splits.train, splits.val, splits.test))
    return Bench(config, splits, train_x, *tensors)


@contextlib.contextmanager
def thread_limit(threads: int) -> Iterator[None]:
    """The same thread count for torch's intra-op pool and NumPy's BLAS, restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with threadpool_limits(limits=threads, user_api="blas"):
            yield
    finally:
        torch.set_num_threads(before)


@dataclass
class StopWatch:
    """Wall and CPU seconds summed over the timed sections only."""
    wall: float = 0.0
    cpu: float = 0.0

    @contextlib.contextmanager
    def timing(self) -> Iterator[None]:
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.wall += time.perf_counter() - wall
            self.cpu += time.process_time() - cpu


# ---- the seed's weights in our model ---------------------------------------------------------

def seed_shell(bench: Bench, pair: Pair) -> MLPVAE:
    """An MLPVAE of the pair's widths to copy seed weights into. Built once per run, because
    building one draws its initial weights from torch's global generator."""
    _, c, h, w = bench.train_images.shape
    return MLPVAE(VAEConfig("mlp", c, h, w, pair.latent, (pair.hidden,), (), "bernoulli"))


@torch.no_grad()
def load_seed_weights(vae: MLPVAE, seed: SeedVAE) -> MLPVAE:
    """Copy the seed's weights into vae. NumPy weights are (in, out), a torch Linear's are
    (out, in); to_params yields mu then log_var, so its rows are the mu head's above log_var's."""
    p = seed.params
    heads = (np.concatenate([p["mu"][0], p["log_var"][0]], axis=1), np.concatenate([p["mu"][1], p["log_var"][1]]))
    layers = ((vae.encoder[0], p["enc"]), (vae.to_params, heads), (vae.decoder[0], p["dec"]),
              (vae.decoder[2], p["out"]))
    for layer, (weight, bias) in layers:
        layer.weight.copy_(torch.from_numpy(weight.T))
        layer.bias.copy_(torch.from_numpy(bias))
    return vae


@torch.no_grad()
def check_conversion(seed: SeedVAE, vae: MLPVAE, images: torch.Tensor) -> float:
    """Assert the converted model gives the NumPy forward's mu, log_var and decoded mean (same
    noise) within CONVERSION_TOLERANCE; return the largest absolute difference."""
    x = images.flatten(1).double().numpy()
    eps = np.random.default_rng(1).standard_normal((len(x), seed.n_latent))
    expected = seed.forward(x, eps)
    mu, log_var = vae.encode(images)
    decoded = vae.mean(vae.decode_logits(vae.reparameterize(mu, log_var, torch.as_tensor(eps).float())))
    worst = 0.0
    for name, got in (("mu", mu), ("log_var", log_var), ("y", decoded.flatten(1))):
        diff = float(np.max(np.abs(got.double().numpy() - expected[name])))
        assert diff <= CONVERSION_TOLERANCE, f"converted {name} is off the NumPy forward by {diff:.2e}"
        worst = max(worst, diff)
    return worst


# ---- the contenders --------------------------------------------------------------------------

@dataclass
class Trained:
    vae: VAE                                    # final weights, as a torch model for the shared evaluator
    watch: StopWatch                            # the optimisation loop only
    curve: list[tuple[float, float]] = field(default_factory=list)  # (timed seconds, val -ELBO) per epoch
    conversion_error: float | None = None       # the seed only: NumPy forward vs converted model


def seed_epoch(model: SeedVAE, x: np.ndarray, batch_size: int) -> None:
    """One epoch as seed_numpy.train_seed runs it: a fresh shuffle, the partial batch dropped."""
    order = model.rng.permutation(len(x))
    for step in range(len(x) // batch_size):
        model.step(x[order[step * batch_size:(step + 1) * batch_size]], SEED_ETA)


def train_seed_numpy(bench: Bench, pair: Pair, track_validation: bool = True) -> Trained:
    """The seed's training at the pair's widths; validation between epochs is not timed."""
    model = SeedVAE(n_in=bench.train_x.shape[1], n_hidden=pair.hidden, n_latent=pair.latent,
                    seed=bench.config.seed)
    shell, watch, curve = seed_shell(bench, pair), StopWatch(), []
    for _ in range(pair.epochs):
        with watch.timing():
            seed_epoch(model, bench.train_x, bench.config.batch_size)
        if track_validation:
            curve.append((watch.wall, bench.val_elbo(load_seed_weights(shell, model))))
    vae = load_seed_weights(shell, model)
    return Trained(vae, watch, curve, check_conversion(model, vae, bench.val_images[:64]))


def train_ours(bench: Bench, pair: Pair, track_validation: bool = True) -> Trained:
    """train()'s model, optimiser and loop of train_epoch calls. Its per-epoch validation,
    checkpoints and logging are not part of the optimisation, so they are not timed."""
    config = bench.pair_config(pair)
    torch.manual_seed(config.seed)              # the initial weights, seeded as train() does
    vae = build_vae(vae_config_of(config, bench.splits))
    optimizer = make_optimizer(vae, config)
    watch, curve = StopWatch(), []
    for epoch in range(config.epochs):
        with watch.timing():
            train_epoch(vae, optimizer, bench.train_images, config, epoch, SINGLE, not config.quiet)
        if track_validation:
            curve.append((watch.wall, bench.val_elbo(vae)))
    return Trained(vae, watch, curve)


Contender = Callable[..., Trained]
CONTENDERS: dict[str, Contender] = {
    "seed": train_seed_numpy,
    "ours": train_ours,
}


# ---- the timed rounds ------------------------------------------------------------------------

@dataclass
class Run:
    round: int
    position: int          # place in its round; the order reverses every round
    pair: Pair
    contender: str
    images: int
    trained: Trained

    @property
    def images_per_second(self) -> float:
        return self.images / self.trained.watch.wall


def warm_up(bench: Bench, pairs: list[Pair]) -> None:
    """Two untimed epochs of everything, so first-call costs do not land in round 1."""
    for pair in pairs:
        for contender in CONTENDERS.values():
            contender(bench, replace(pair, epochs=2), False)


def run_rounds(bench: Bench, pairs: list[Pair], rounds: int) -> list[Run]:
    """Every contender on every pair, each round in the reverse order of the one before, so a
    drift in the machine's load hits every contender alike."""
    schedule = [(pair, name) for pair in pairs for name in CONTENDERS]
    runs = []
    for number in range(1, rounds + 1):
        order = schedule if number % 2 else schedule[::-1]
        for position, (pair, name) in enumerate(order, start=1):
            trained = CONTENDERS[name](bench, pair)
            runs.append(Run(number, position, pair, name, bench.images_trained(pair), trained))
            log(f"round {number}/{rounds}  {pair.label:<28} {name:<10} {trained.watch.wall:7.2f} s  "
                f"{runs[-1].images_per_second:9,.0f} img/s  val -ELBO {trained.curve[-1][1]:.3f}")
    return runs


def runs_of(runs: list[Run], pair: Pair, name: str) -> list[Run]:
    return [run for run in runs if run.pair == pair and run.contender == name]


def median_run(runs: list[Run], pair: Pair, name: str) -> Run:
    """The round whose time is the median (the lower middle one for an even count)."""
    chosen = sorted(runs_of(runs, pair, name), key=lambda run: run.trained.watch.wall)
    return chosen[(len(chosen) - 1) // 2]


def ratio_per_round(runs: list[Run], pair: Pair, name: str) -> list[float]:
    """images/s of name over the seed's in the same round: the two ran minutes apart at most."""
    seed = {run.round: run.images_per_second for run in runs_of(runs, pair, "seed")}
    return [run.images_per_second / seed[run.round] for run in runs_of(runs, pair, name)]


# ---- side experiments ------------------------------------------------------------------------

def probe_threads(bench: Bench, pair: Pair, epochs: dict[str, int], rounds: int) -> dict[tuple[str, int], list[float]]:
    """images/s of the seed and ours at 1 thread and at torch's default count, interleaved. Each
    contender gets its own epoch count, so that even the fast seed runs long enough to time."""
    default = torch.get_num_threads()
    settings = [1, default] if default > 1 else [1]
    results: dict[tuple[str, int], list[float]] = defaultdict(list)
    for number in range(rounds):
        for threads in settings if number % 2 == 0 else settings[::-1]:
            with thread_limit(threads):
                for name, contender_epochs in epochs.items():
                    probe_pair = replace(pair, epochs=contender_epochs)
                    trained = CONTENDERS[name](bench, probe_pair, False)
                    results[(name, threads)].append(bench.images_trained(probe_pair) / trained.watch.wall)
                    log(f"threads probe: {name} at {threads} thread(s): {results[(name, threads)][-1]:,.0f} img/s")
    return results


def seed_width_check(bench: Bench, widths: tuple[int, ...], latent: int) -> list[tuple[int, bool, float]]:
    """Whether the seed's SGD on batch-summed gradients survives one epoch at each width, and the
    mean training -ELBO after it (NaN when it diverged). It bounds how wide the widened pair can go."""
    rows = []
    for width in widths:
        model = SeedVAE(n_in=bench.train_x.shape[1], n_hidden=width, n_latent=latent, seed=bench.config.seed)
        with np.errstate(all="ignore"):
            seed_epoch(model, bench.train_x, bench.config.batch_size)
            finite = all(np.isfinite(array).all() for layer in model.params.values() for array in layer)
            rec, kl = model.losses(bench.train_x)
        rows.append((width, finite, rec + kl))
    return rows


def bernoulli_floor(images: torch.Tensor) -> float:
    """The least a Bernoulli reconstruction term can be, per image: the pixels' binary entropy.
    Digits / 16 are grey levels, not bits, so even a perfect decoder pays this."""
    p = images.flatten(1).double().clamp(1e-12, 1 - 1e-12)
    return float(-(p * p.log() + (1 - p) * (1 - p).log()).sum(1).mean())


# ---- quality, by one evaluator ---------------------------------------------------------------

@torch.no_grad()
def held_out_metrics(bench: Bench, vae: VAE) -> dict[str, float]:
    """Validation and test -ELBO (one sample per image) and the IWAE-128 bound on test, with the
    seeds and limits of training.train.test_metrics, so they line up with train()'s metadata."""
    seed = bench.config.seed
    val = evaluate(vae, bench.val_images, seed, SINGLE)
    test = evaluate(vae, bench.test_images, seed + 1, SINGLE)
    iwae = ServableVAE(vae, "iwae", IWAE_SAMPLES, seed + 2).eval()
    nll = score_images(iwae, bench.test_images[:IWAE_MAX_IMAGES], batch_size=DECODES_PER_BATCH // IWAE_SAMPLES)
    return {**{f"val_{k}": v for k, v in val.items()}, **{f"test_{k}": v for k, v in test.items()},
            "test_iwae": float(nll.mean()), "test_iwae_sem": float(nll.std(ddof=1) / np.sqrt(len(nll)))}


def train_better(threads: int, epochs_cap: int | None, folder: Path) -> list[dict[str, Any]]:
    """Train each of BETTER_CONFIGS end to end with train() (Bernoulli likelihood throughout, so the
    nats compare with the seed's); return the test figures from its metadata."""
    rows = []
    for number, (label, overrides) in enumerate(BETTER_CONFIGS.items()):
        config = TrainConfig(data="digits", out=str(folder / f"config{number}.pt"), report=False,
                             checkpoint_every=0, quiet=True, threads=threads, **overrides)
        if epochs_cap is not None:
            config = replace(config, epochs=min(config.epochs or epochs_cap, epochs_cap))
        started = time.perf_counter()
        # train() logs a line every tenth epoch; the table below keeps what matters
        with thread_limit(threads), contextlib.redirect_stdout(io.StringIO()):
            metadata = train(config)
        metrics = metadata["metrics"]
        rows.append({"label": label, "overrides": overrides, "parameters": metadata["architecture"]["parameters"],
                     "epochs_run": metrics["epochs_run"], "best_epoch": metrics["best_epoch"],
                     "test_elbo": metrics["test_elbo"], "test_iwae": metrics["test_nll_iwae"],
                     "seconds": time.perf_counter() - started})
        log(f"better config {label}: test -ELBO {metrics['test_elbo']:.3f}, IWAE {metrics['test_nll_iwae']:.3f}, "
            f"{rows[-1]['seconds']:.0f} s")
    return rows


# ---- the report ------------------------------------------------------------------------------

@dataclass
class Results:
    command: str
    threads: int
    rounds: int
    started: datetime
    seconds: float
    load: tuple[float, float]                   # 1-minute load average at the start and the end
    bench: Bench
    pairs: list[Pair]
    runs: list[Run]
    quality: dict[tuple[Pair, str], dict[str, float]]
    probe: dict[tuple[str, int], list[float]]
    probe_epochs: dict[str, int]
    widths: list[tuple[int, bool, float]]
    better: list[dict[str, Any]]
    floor: float


def md_table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows])


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def header_section(r: Results) -> str:
    b, cfg = r.bench, r.bench.config
    return "\n".join([
        "# Training benchmark: our PyTorch trainer vs the seed's NumPy VAE", "",
        f"- date: {r.started:%Y-%m-%d %H:%M} UTC; whole benchmark {r.seconds / 60:.1f} min wall time",
        f"- machine: {os.cpu_count()} cores (nproc), {cpu_model()}, {platform.system()} {platform.release()}; "
        f"Python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}",
        f"- 1-minute load average at start / end: {r.load[0]:.2f} / {r.load[1]:.2f} (shared machine)",
        f"- command: `{r.command}`",
        f"- threads: {r.threads} for both contenders (torch intra-op and NumPy's BLAS), see Threads below",
        f"- rounds: {r.rounds}; every contender on every pair each round, the order reversed every round, "
        "after an untimed 2-epoch warm-up; tables give medians, raw rounds further down",
        f"- data: digits / 16, the seeded split (seed {cfg.seed}, val/cal/test {cfg.val_fraction}/"
        f"{cfg.cal_fraction}/{cfg.test_fraction}): train {len(b.train_x)}, val {len(b.val_images)}, "
        f"test {len(b.test_images)} images; batch {cfg.batch_size}, {b.steps_per_epoch} steps per epoch "
        "(partial batch dropped on both sides)",
        f"- seed: SGD, eta {SEED_ETA} on batch-summed gradients, float64. Ours: Adam lr {cfg.lr} on the "
        "batch-mean loss, float32, `train_epoch` called as `train()` calls it",
        "- timed: the optimisation loop only (no data loading, validation, checkpoints or export); "
        "images/s = epochs x steps per epoch x batch / seconds",
    ])


def throughput_section(r: Results) -> str:
    rows = []
    for pair in r.pairs:
        for name in CONTENDERS:
            runs = runs_of(r.runs, pair, name)
            ratios = ratio_per_round(r.runs, pair, name)
            ratio = "1 (reference)" if name == "seed" else f"{statistics.median(ratios):.3f}"
            rows.append([pair.label, CONTENDER_LABELS[name], pair.epochs, f"{runs[0].images:,}",
                         f"{statistics.median(run.trained.watch.wall for run in runs):.2f}",
                         f"{statistics.median(run.trained.watch.cpu for run in runs):.2f}",
                         f"{statistics.median(run.images_per_second for run in runs):,.0f}", ratio])
    headers = ["pair", "contender", "epochs", "images", "wall s", "CPU s", "images/s", "images/s vs seed"]
    return ("## Throughput (medians)\n\n" + md_table(headers, rows) + "\n\n"
            "The ratio is the median of per-round ratios: each contender against the seed of the same round. "
            "Wall seconds above CPU seconds mean the process waited for a core: the machine's other load.")


def raw_section(r: Results) -> str:
    rows = []
    for run in sorted(r.runs, key=lambda run: (run.round, run.position)):
        seed_ips = runs_of([x for x in r.runs if x.round == run.round], run.pair, "seed")[0].images_per_second
        rows.append([run.round, run.position, run.pair.label, run.contender, f"{run.trained.watch.wall:.3f}",
                     f"{run.trained.watch.cpu:.3f}", f"{run.images_per_second:,.0f}",
                     f"{run.images_per_second / seed_ips:.3f}", f"{run.trained.curve[-1][1]:.4f}"])
    headers = ["round", "order", "pair", "contender", "wall s", "CPU s", "images/s", "vs seed", "final val -ELBO"]
    return "## Per-round raw numbers\n\n" + md_table(headers, rows)


def seconds_to_reach(curve: list[tuple[float, float]], target: float) -> str:
    """Optimisation seconds until the validation -ELBO first reaches target, as table text."""
    reached = next((f"{seconds:.2f} (epoch {epoch})" for epoch, (seconds, val) in enumerate(curve, start=1)
                    if val <= target), None)
    return reached or "not reached"


def quality_section(r: Results) -> str:
    rows = []
    for pair in r.pairs:
        target = median_run(r.runs, pair, "seed").trained.curve[-1][1]
        for name in CONTENDERS:
            m, curve = r.quality[(pair, name)], median_run(r.runs, pair, name).trained.curve
            best_epoch = min(range(len(curve)), key=lambda i: curve[i][1])
            rows.append([pair.label, CONTENDER_LABELS[name],
                         f"{m['val_total']:.3f} ({m['val_rec']:.2f} + {m['val_kl']:.2f})",
                         f"{curve[best_epoch][1]:.3f} ({best_epoch + 1})", seconds_to_reach(curve, target),
                         f"{m['test_total']:.3f} ({m['test_rec']:.2f} + {m['test_kl']:.2f})",
                         f"{m['test_iwae']:.3f} ± {m['test_iwae_sem']:.2f}"])
    headers = ["pair", "contender", "final val -ELBO (rec + KL)", "best val -ELBO (epoch)",
               "s to the seed's final val -ELBO", "final test -ELBO (rec + KL)", "test IWAE-128 bound ± s.e."]
    conversion = max(run.trained.conversion_error for run in r.runs if run.contender == "seed")
    repeatable = all(len({run.trained.curve[-1][1] for run in runs_of(r.runs, pair, name)}) == 1
                     for pair in r.pairs for name in CONTENDERS)
    return ("## Quality reached, same evaluator (nats per image, final weights)\n\n" + md_table(headers, rows) + "\n\n"
            "The seed's NumPy weights are copied into our `MLPVAE` (transposed; the mu and log_var heads stacked "
            "into `to_params`) and scored by `training.train.evaluate` (one sample per image, fixed noise) and "
            f"`ServableVAE(vae, \"iwae\", {IWAE_SAMPLES}, seed + 2)`, the seeds `train()` uses for its test metrics. "
            f"Conversion check (asserted every run): mu, log_var and decoded mean match the NumPy forward to "
            f"{conversion:.1e} at most (tolerance {CONVERSION_TOLERANCE:g}). 'Best val' is the lowest point of "
            "the per-epoch validation curve; `train()` would keep those weights, the table's other columns use "
            "the final ones for both sides. 'To the seed's final' is time-to-quality: the optimisation seconds "
            "(median round) until the validation -ELBO first reaches what the seed ends with (the seed's own, "
            "noisy curve may touch it before its last epoch). Every round trained "
            f"{'the same' if repeatable else 'NOT the same'} model per contender (identical final validation "
            "-ELBO), so these figures come from one of them.")


def better_section(r: Results) -> str:
    ours_seed_arch = r.better[0]["test_elbo"]
    rows = [["seed's reported figure (reference)", "", "201", f"{SEED_REFERENCE_TEST_ELBO:.1f}", "", "0", "", ""]]
    for row in r.better:
        rows.append([row["label"], f"{row['parameters']:,}", f"{row['epochs_run']} ({row['best_epoch']})",
                     f"{row['test_elbo']:.3f}", f"{row['test_iwae']:.3f}",
                     f"{SEED_REFERENCE_TEST_ELBO - row['test_elbo']:+.2f}",
                     f"{ours_seed_arch - row['test_elbo']:+.2f}", f"{row['seconds']:.0f}"])
    headers = ["configuration (all Bernoulli, Adam 1e-3)", "parameters", "epochs run (best)", "test -ELBO",
               "test IWAE-128", "better than 25.4 by", "better than ours 64-16-2 by", "train() s"]
    overrides = "; ".join(f"{row['label']}: `{row['overrides'] or 'defaults'}`" for row in r.better)
    return ("## Better configurations (`training.train.train`, best-validation weights)\n\n" + md_table(headers, rows)
            + f"\n\nSettings: {overrides}. Patience stops on the validation -ELBO and `train()` keeps the best "
            "epoch's weights; its seconds include data loading, per-epoch validation and export. The Bernoulli "
            f"reconstruction term cannot go below the pixels' binary entropy, {r.floor:.2f} nats per test image "
            "(digits / 16 are grey levels, not bits), so that is the floor of every figure here. The test split "
            f"has only {len(r.bench.test_images)} images: differences of a few tenths of a nat are within noise.")


def threads_section(r: Results) -> str:
    settings = sorted({threads for _, threads in r.probe})
    rows = []
    for name, epochs in r.probe_epochs.items():
        speeds = [r.probe[(name, threads)] for threads in settings]
        cells = [f"{statistics.median(v):,.0f} ({min(v):,.0f} to {max(v):,.0f})" for v in speeds]
        ratio = statistics.median(speeds[0]) / statistics.median(speeds[-1])
        rows.append([CONTENDER_LABELS[name], epochs, *cells, f"{ratio:.2f}x" if len(settings) > 1 else ""])
    headers = ["contender (seed architecture)", "epochs per probe",
               *(f"images/s at {t} thread(s): median (min to max)" for t in settings), "median at 1 / at default"]
    rounds = len(next(iter(r.probe.values())))
    return ("## Threads\n\n" + md_table(headers, rows) + "\n\n"
            f"Short probe runs, {rounds} rounds, interleaved, at 1 thread and at torch's default (one per core); "
            "NumPy's BLAS was given the same count. The products here are tiny (32 x 64 x 16 to 32 x 64 x 256), "
            "so a second thread has little to split, and every parallel region waits for its slowest thread: "
            "when the other core is busy (a shared machine), that wait can cost more than the operation, which "
            f"is what a minimum far below the median shows. This run used `--threads {r.threads}` for both "
            "contenders and for `train()` below: the same resources on both sides, and the setting whose speed "
            "depends least on what else runs on the machine. `train()` itself uses torch's default unless "
            "`--threads` is given.")


def widths_section(r: Results) -> str:
    rows = [[width, "yes" if finite else "no, diverged", f"{elbo:.2f}"] for width, finite, elbo in r.widths]
    return ("## How wide the seed can go\n\n"
            + md_table(["hidden width (latent 2)", "weights finite after 1 epoch", "train -ELBO after 1 epoch"], rows)
            + "\n\nThe seed's SGD takes eta = 0.001 steps on gradients summed over 32 images; at widths where it "
            "diverges the seed has no result to compare, which is why the widened pair stops there.")


def summary_section(r: Results) -> str:
    lines = ["## Summary", ""]
    for pair in r.pairs:
        ratio = statistics.median(ratio_per_round(r.runs, pair, "ours"))
        seed_q, ours_q = r.quality[(pair, "seed")], r.quality[(pair, "ours")]
        lines.append(f"- {pair.label}, {pair.epochs} epochs: ours trains at {ratio:.2f}x the seed's images/s; "
                     f"final validation -ELBO seed "
                     f"{seed_q['val_total']:.2f} vs ours {ours_q['val_total']:.2f}, test -ELBO seed "
                     f"{seed_q['test_total']:.2f} vs ours {ours_q['test_total']:.2f} nats per image")
    best = min(r.better, key=lambda row: row["test_elbo"])
    lines.append(f"- best larger configuration: {best['label']}, test -ELBO {best['test_elbo']:.2f} (IWAE-128 "
                 f"{best['test_iwae']:.2f}): {SEED_REFERENCE_TEST_ELBO - best['test_elbo']:+.2f} nats better than the "
                 f"seed's {SEED_REFERENCE_TEST_ELBO}; the Bernoulli floor on this test split is {r.floor:.2f}")
    return "\n".join(lines)


def render(r: Results, plot_name: str) -> str:
    sections = [header_section(r), summary_section(r), throughput_section(r), quality_section(r), better_section(r),
                threads_section(r), widths_section(r), raw_section(r),
                f"## Plot\n\n![validation -ELBO against optimisation seconds, and images/s]({plot_name})"]
    return "\n\n".join(sections) + "\n"


def plot_results(r: Results, path: Path) -> None:
    """Validation -ELBO against optimisation seconds per pair (median round), and images/s bars."""
    import matplotlib

    matplotlib.use("Agg")                       # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    fig, axes = plt.subplots(1, len(r.pairs) + 1, figsize=(5.5 * (len(r.pairs) + 1), 4.5))
    for ax, pair in zip(axes, r.pairs, strict=False):
        tops = []
        for name in CONTENDERS:
            run = median_run(r.runs, pair, name)
            seconds, val = zip(*run.trained.curve, strict=True)
            ax.plot(seconds, val, label=f"{name} ({run.images_per_second:,.0f} img/s)")
            tops.append(max(val[len(val) // 20:]))    # the first epochs' losses would flatten the rest
        ax.set(xscale="log", xlabel="optimisation seconds (log)", ylabel="validation -ELBO, nats per image",
               title=pair.label, ylim=(None, max(tops) + 0.5))
        ax.xaxis.set_minor_formatter(NullFormatter())   # the minor labels of a log axis overlap
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    bars, width = axes[-1], 0.8 / len(CONTENDERS)
    for k, name in enumerate(CONTENDERS):
        for i, pair in enumerate(r.pairs):
            values = [run.images_per_second for run in runs_of(r.runs, pair, name)]
            bars.bar(i + k * width, statistics.median(values), width, color=f"C{k}", label=name if i == 0 else None)
            bars.plot([i + k * width] * len(values), values, "k.", markersize=4)
    bars.set(xticks=[i + width * (len(CONTENDERS) - 1) / 2 for i in range(len(r.pairs))],
             xticklabels=[pair.label for pair in r.pairs], ylabel="images/s (bars: median, dots: rounds)",
             title=f"throughput, {r.threads} thread(s)")
    bars.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- the run ---------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.train_vs_seed",
                                     description="Our PyTorch trainer against the seed's NumPy VAE.")
    parser.add_argument("--quick", action="store_true",
                        help="a few epochs everywhere, for a smoke run; writes train_vs_seed_quick.*")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 3; 2 with --quick)")
    parser.add_argument("--threads", type=int, default=1,
                        help="threads for both contenders and for train() (default 1, the fastest here: see report)")
    return parser.parse_args(argv)


def quality_of(bench: Bench, runs: list[Run], pairs: list[Pair]) -> dict[tuple[Pair, str], dict[str, float]]:
    """Held-out figures of each contender's final model (every round trains the same one)."""
    return {(pair, name): held_out_metrics(bench, median_run(runs, pair, name).trained.vae)
            for pair in pairs for name in CONTENDERS}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 3)
    started, clock, load_start = datetime.now(UTC), time.perf_counter(), os.getloadavg()[0]
    bench = load_bench()
    epochs = 5 if args.quick else bench.config.epochs
    pairs = [Pair(f"seed architecture 64-{bench.config.hidden[0]}-{bench.config.latent_dim}",
                  bench.config.hidden[0], bench.config.latent_dim, epochs),
             Pair("widened 64-256-8", 256, 8, epochs)]

    warm_up(bench, pairs)
    probe_epochs = {"seed": 2, "ours": 1} if args.quick else {"seed": 40, "ours": 10}
    probe = probe_threads(bench, pairs[0], probe_epochs, 1 if args.quick else 3)
    widths = seed_width_check(bench, (16, 256, 512, 1024), latent=2)
    with thread_limit(args.threads):
        warm_up(bench, pairs)
        runs = run_rounds(bench, pairs, rounds)
        quality = quality_of(bench, runs, pairs)
    with tempfile.TemporaryDirectory(prefix="train_vs_seed-") as folder:
        better = train_better(args.threads, 5 if args.quick else None, Path(folder))

    command = shlex.join([os.path.relpath(sys.executable), "-m", "benchmarks.train_vs_seed",
                          *(argv if argv is not None else sys.argv[1:])])
    results = Results(f"cd {Path.cwd()} && {command}", args.threads, rounds, started, time.perf_counter() - clock,
                      (load_start, os.getloadavg()[0]), bench, pairs, runs, quality, probe, probe_epochs, widths,
                      better, bernoulli_floor(bench.test_images))
    stem = "train_vs_seed_quick" if args.quick else "train_vs_seed"
    plot_results(results, RESULTS_DIR / f"{stem}.png")
    report = render(results, f"{stem}.png")
    (RESULTS_DIR / f"{stem}.md").write_text(report)
    print(report)
    log(f"wrote {RESULTS_DIR / stem}.md and .png in {results.seconds / 60:.1f} min")


if __name__ == "__main__":
    main()
