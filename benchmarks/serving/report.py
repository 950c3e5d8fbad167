"""The results as markdown (printed and written to benchmarks/results/serving.md) and a plot
(serving.png): the issue's targets first, then every contender at every concurrency, the 64-image
request, both floors, the contenders' versions and settings, and our service's own histograms."""

from __future__ import annotations

import hashlib
import math
import statistics
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from training.report import machine

from .compute import ComputeFloor
from .contenders import Contender
from .load import LoadResult
from .promstats import HISTOGRAMS
from .session import Results, Run


@dataclass
class RunInfo:
    started: float
    finished: float
    load_start: float
    load_end: float
    command: str
    wrk: str
    model: Path
    duration: float
    warmup: float
    batch_duration: float
    rounds: int
    floor_bytes: int


def ms(seconds: float) -> str:
    return "–" if seconds is None or math.isnan(seconds) else f"{seconds * 1e3:.2f}"


def pick(runs: list[Run]) -> Run | None:
    """The run with the median req/s among those that finished (one per round)."""
    done = sorted((r for r in runs if r.load is not None), key=lambda r: r.load.rps)
    return done[len(done) // 2] if done else (runs[0] if runs else None)


def header(info: RunInfo, one_png_bytes: int) -> list[str]:
    sha = hashlib.sha256(info.model.read_bytes()).hexdigest()[:12]
    when = datetime.fromtimestamp(info.started, UTC).strftime("%Y-%m-%d %H:%M UTC")
    return [
        "# Serving benchmark: ours against a naive FastAPI endpoint, LitServe and TorchServe", "",
        f"- Date: {when}; the run took {(info.finished - info.started) / 60:.1f} min",
        f"- Machine: {machine()}; shared and noisy. 1-min load average {info.load_start:.2f} at the start, "
        f"{info.load_end:.2f} at the end (other work on the machine counts in it)",
        f"- Command: `{info.command}`",
        f"- Model: `{info.model}` (sha256 {sha}…), the 28x28 grayscale convolutional VAE; every contender "
        "loads this TorchScript file and calls its `score`",
        f"- Workload: one real Fashion-MNIST test image as a {one_png_bytes}-byte PNG per request, POSTed as the raw "
        "body (`Content-Type: image/png`) to the contender's scoring path (LitServe gets the same PNG as a one-part "
        "multipart upload: it reads any other body as JSON); "
        f"{info.warmup:g} s warm-up, then {info.duration:g} s measured, per contender and concurrency; "
        f"{info.rounds} round(s), contenders in rotating order at each level, one server up at a time",
        f"- Load generator: {info.wrk}, `-t1 -cN --timeout 30s` with benchmarks/serving/post.lua "
        "(its latency distribution gives p50/p99). It shares the 2 cores with the server it loads: the "
        "`wrk CPU` column says how much of one core it took. Errors: wrk's non-2xx (status >= 400) and "
        "socket errors (connect, read, write, timeout)", "",
    ]


def targets(contenders: list[Contender], results: Results, floors: list[ComputeFloor]) -> list[str]:
    """The issue's ratios. At 1 connection, each round against the floors measured beside it, and
    (stricter) the median round against the fastest compute floor of the whole run."""
    def cell(key: str, connections: int) -> LoadResult | None:
        run = pick(results.of(key, connections))
        return run.load if run else None

    top, low = max(results.levels), min(results.levels)
    ours, lines = cell("ours", top), ["## The issue's targets", "", "| target | measured | want | met |",
                                      "| --- | --- | --- | --- |"]
    for peer, label, want in (("torchserve", "TorchServe", 1.0), ("litserve", "LitServe", 2.0)):
        theirs = cell(peer, top)
        if ours and theirs and theirs.rps:
            ratio = ours.rps / theirs.rps
            lines.append(f"| ours / {label} req/s at {top} connections | {ratio:.2f}x ({ours.rps:.0f} / "
                         f"{theirs.rps:.0f}) | ≥ {want:g}x | {'yes' if ratio >= want else 'no'} |")
        else:
            lines.append(f"| ours / {label} req/s at {top} connections | n/a ({label} or ours did not run) | "
                         f"≥ {want:g}x | – |")
    if ours:
        lines.append(f"| ours p99 at {top} connections | {ms(ours.p99)} ms | < 100 ms | "
                     f"{'yes' if ours.p99 < 0.1 else 'no'} |")
        lines.append(f"| ours errors at {top} connections | {ours.errors} | 0 | "
                     f"{'yes' if ours.errors == 0 else 'no'} |")
    rounds = one_connection_rounds(results, floors)
    if rounds:
        ratio = statistics.median(r.ratio for r in rounds)
        each = ", ".join(f"{r.ratio:.2f}" for r in rounds)
        lines.append(f"| ours p50 at {low} connection / (HTTP floor p50 + compute floor per image at batch 1), "
                     f"each round against the floors measured beside it | {ratio:.2f}x (median of {len(rounds)} "
                     f"round(s): {each}) | ≤ 1.5x | {'yes' if ratio <= 1.5 else 'no'} |")
    ours_one, floor_one = cell("ours", low), cell("http-floor", low)
    fastest = min((f.floor_1 for f in floors), default=None)
    if ours_one and floor_one and fastest is not None:
        ratio = ours_one.p50 / (floor_one.p50 + fastest)
        lines.append(f"| the same, stricter: the median round against the fastest compute floor of the whole run | "
                     f"{ratio:.2f}x ({ms(ours_one.p50)} / ({ms(floor_one.p50)} + {ms(fastest)}) ms) | ≤ 1.5x | "
                     f"{'yes' if ratio <= 1.5 else 'no'} |")
    return [*lines, "", *one_connection_table(rounds, low)]


@dataclass
class OneConnectionRound:
    round: int
    ours_p50: float
    http_floor_p50: float
    compute_floor: float

    @property
    def ratio(self) -> float:
        return self.ours_p50 / (self.http_floor_p50 + self.compute_floor)


def one_connection_rounds(results: Results, floors: list[ComputeFloor]) -> list[OneConnectionRound]:
    """Per round with ours and the HTTP floor measured at the lowest concurrency: their p50s and
    the smallest compute floor measured right before or after that level (any torch threads)."""
    low, rounds = min(results.levels), []
    for round_index in sorted({r.round for r in results.runs}):
        ours = next((r.load for r in results.of("ours", low) if r.round == round_index and r.load), None)
        http = next((r.load for r in results.of("http-floor", low) if r.round == round_index and r.load), None)
        beside = [f.floor_1 for f in floors if f.round == round_index]
        if ours and http and beside:
            rounds.append(OneConnectionRound(round_index, ours.p50, http.p50, min(beside)))
    return rounds


def one_connection_table(rounds: list[OneConnectionRound], low: int) -> list[str]:
    if not rounds:
        return []
    lines = [f"At {low} connection, per round (the compute floor measured right before and after that level, the "
             "smaller of the two and of 1 or 2 torch threads):", "",
             "| round | ours p50 ms | HTTP floor p50 ms | compute floor ms | ratio |",
             "| ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r.round + 1} | {ms(r.ours_p50)} | {ms(r.http_floor_p50)} | {ms(r.compute_floor)} | "
              f"{r.ratio:.2f}x |" for r in rounds]
    return [*lines, ""]


def throughput(contenders: list[Contender], results: Results, duration: float) -> list[str]:
    lines = ["## Throughput and latency, one image per request", "",
             "`server CPU` is the CPU time of the server's whole process tree during the measured window, per request "
             "and as cores busy; on a shared machine it is steadier than req/s. `held by` is how many of wrk's "
             "connections each server process held midway through the window (several processes: several workers "
             "accepting).", "",
             "| contender | connections | req/s | p50 ms | p99 ms | errors (non-2xx / socket) | server CPU ms/req "
             "| server cores | wrk CPU | load avg | held by |",
             "| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | --- |"]
    for contender in contenders:
        for connections in results.levels:
            run = pick(results.of(contender.key, connections))
            if run is None:
                lines.append(f"| {contender.label} | {connections} | skipped: {contender.skip_reason or 'not run'} "
                             "| | | | | | | | |")
            elif run.load is None:
                lines.append(f"| {contender.label} | {connections} | failed: {run.error} | | | | | | | | |")
            else:
                load = run.load
                cpu = run.server_cpu_s / load.requests * 1e3 if load.requests else math.nan
                lines.append(f"| {contender.label} | {connections} | {load.rps:.1f} | {ms(load.p50)} | {ms(load.p99)} "
                             f"| {load.status_errors} / {load.socket_errors} | {cpu:.2f} | "
                             f"{run.server_cpu_s / load.seconds:.2f} | {load.wrk_cpu_seconds / load.seconds:.0%} | "
                             f"{run.load_avg:.2f} | {'/'.join(map(str, run.held_by)) or '–'} |")
    return [*lines, ""]


def batches(contenders: list[Contender], results: Results, duration: float) -> list[str]:
    lines = ["## One request holding 64 images", "",
             f"Back-to-back on one connection for {duration:g} s (after a 1 s warm-up), measured in the first "
             "level's session; p50 is the latency of one such request.", "",
             "| contender | request | p50 ms | p99 ms | requests | ms per image (p50 / 64) | errors |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for contender in contenders:
        result = results.batches.get(contender.key)
        if isinstance(result, LoadResult):
            lines.append(f"| {contender.label} | {contender.batch_note} | {ms(result.p50)} | {ms(result.p99)} | "
                         f"{result.requests} | {result.p50 / 64 * 1e3:.3f} | {result.errors} |")
        elif isinstance(result, str):
            lines.append(f"| {contender.label} | {contender.batch_note} | failed: {result} | | | | |")
        else:
            lines.append(f"| {contender.label} | {contender.batch_note} | | | | | |")
    return [*lines, ""]


def compute_floor(floors: list[ComputeFloor]) -> list[str]:
    us = 1e6
    lines = ["## Compute floor (in process, no HTTP)", "",
             "Median time per image: Pillow decodes the PNG to float32, the TorchScript module's `score` runs under "
             "`torch.inference_mode()`. Measured at the start and the end of the run, and right before and after "
             "each round's lowest concurrency. The 1-connection target uses, per round, the smallest per-image time "
             "at batch 1 measured beside that round, decode + score timed together or apart (summed): a floor is a "
             "lower bound, and on a shared machine a noisy moment inflates a measurement. The stricter row uses the "
             "smallest of all.", "",
             "| measured | torch threads | batch | decode µs/image | score µs/image | decode + score µs/image |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for f in floors:
        lines += [f"| {f.when} | {f.threads} | 1 | {f.decode_1 * us:.0f} | {f.score_1 * us:.0f} | "
                  f"{f.total_1 * us:.0f} |",
                  f"| {f.when} | {f.threads} | 64 | {f.decode_64 * us:.1f} | {f.score_64 * us:.1f} | "
                  f"{f.total_64 * us:.1f} |"]
    return [*lines, ""]


def http_floor(results: Results, floor_bytes: int) -> list[str]:
    lines = ["## HTTP floor", "",
             f"A raw ASGI app (no framework) reading the body and answering a constant {floor_bytes}-byte JSON (the "
             "size of our answer for this image): the HTTP cost without any work. `HTTP floor` runs under the same "
             "uvicorn and venv as ours (loop and parser auto: uvloop and httptools, which the project installs); "
             "`HTTP floor, uvloop` is the same app in LitServe's venv with `--loop uvloop --http httptools` named: "
             "a second measurement of the same stack, which shows how far two runs of one thing differ here.", ""]
    for key, label in (("http-floor", "HTTP floor"), ("http-floor-uvloop", "HTTP floor, uvloop")):
        for connections in results.levels:
            run = pick(results.of(key, connections))
            if run and run.load:
                lines.append(f"- {label}, {connections} connection(s): {run.load.rps:.0f} req/s, p50 "
                             f"{ms(run.load.p50)} ms, p99 {ms(run.load.p99)} ms, server CPU "
                             f"{run.server_cpu_s / max(run.load.requests, 1) * 1e6:.0f} µs/request")
    return [*lines, ""]


def settings(contenders: list[Contender], results: Results) -> list[str]:
    lines = ["## Contenders", "", "| contender | versions | settings | path | answer bytes |",
             "| --- | --- | --- | --- | ---: |"]
    for contender in contenders:
        versions = ", ".join(f"{k} {v}" for k, v in contender.versions.items()) or "–"
        sizes = {r.response_bytes for r in results.runs if r.contender == contender.key and r.response_bytes}
        status = f" **Skipped: {contender.skip_reason}**" if contender.skip_reason else ""
        lines.append(f"| {contender.label} | {versions} | {contender.settings}.{status} | `{contender.path}` | "
                     f"{', '.join(map(str, sorted(sizes))) or '–'} |")
    return [*lines, ""]


def our_metrics(results: Results) -> list[str]:
    lines = ["## Our service's /metrics, measured window only", "",
             "Scraped right before and right after each measured run and subtracted. Quantiles are bucket upper "
             "bounds. vae_http_request_seconds is timed inside the app (uvicorn's parsing and socket work are "
             "outside it).", ""]
    for connections in results.levels:
        run = pick(results.of("ours", connections))
        if run is None or not run.metrics:
            continue
        m = run.metrics
        lines += [f"### {connections} connection(s)", "", "| histogram | count | mean | p50 ≤ | p99 ≤ |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        for name in HISTOGRAMS:
            h = m.get(name)
            if h is None:
                continue
            is_size = name.startswith("vae_batch_images")
            show = (lambda v: f"{v:.1f}") if is_size else (lambda v: f"{ms(v)} ms")
            lines.append(f"| {name} | {h.count:.0f} | {show(h.mean)} | {show(h.quantile(0.5))} | "
                         f"{show(h.quantile(0.99))} |")
        lines += ["", breakdown(m), ""]
    return lines


def breakdown(m: dict) -> str:
    """Mean time of one request, seam by seam, and what the histograms do not cover."""
    http, decode = m.get("vae_http_request_seconds (/anomaly-score)"), m.get("vae_codec_seconds (decode)")
    queue, model = m.get("vae_queue_seconds (score)"), m.get("vae_model_seconds (score, per batch)")
    size = m.get("vae_batch_images (score)")
    if not all(h is not None and h.count for h in (http, decode, queue, model, size)):
        return ""
    rest = http.mean - decode.mean - queue.mean - model.mean
    return (f"Mean request inside the app: {ms(http.mean)} ms = decode {ms(decode.mean)} + queue {ms(queue.mean)} + "
            f"model (its batch) {ms(model.mean)} + the rest (routing or the lean path, p-values, JSON, middleware, "
            f"waiting for the event loop) {ms(rest)} ms. Mean batch {size.mean:.1f} images; model time per image "
            f"{model.total / size.total * 1e6:.0f} µs; {model.count / max(http.count, 1):.2f} batches per request.")


def every_run(contenders: list[Contender], results: Results) -> list[str]:
    """With several rounds, each round's req/s and p99 (the tables above show the median round)."""
    rounds = sorted({r.round for r in results.runs})
    if len(rounds) < 2:
        return []
    lines = ["## Every round", "", "req/s / p99 ms of each round, and in brackets how many of wrk's connections "
             "each server process held (as `held by` above); the tables above show the round with the median "
             "req/s.", "",
             "| contender | connections | " + " | ".join(f"round {i + 1}" for i in rounds) + " |",
             "| --- | ---: |" + " ---: |" * len(rounds)]
    for contender in contenders:
        for connections in results.levels:
            runs = [next((r for r in results.of(contender.key, connections) if r.round == i), None) for i in rounds]
            lines.append(f"| {contender.label} | {connections} | " + " | ".join(map(round_cell, runs)) + " |")
    return [*lines, ""]


def round_cell(run: Run | None) -> str:
    if run is None or run.load is None:
        return "–"
    # one number too: the processes holding none are left out, so "64" may be one worker of two taking all
    split = f" ({'/'.join(map(str, run.held_by))})" if run.held_by else ""
    return f"{run.load.rps:.1f} / {ms(run.load.p99)}{split}"


def skipped(contenders: list[Contender], results: Results) -> list[str]:
    problems = [f"- {c.label}: skipped: {c.skip_reason}" for c in contenders if c.skip_reason]
    problems += [f"- {r.contender} at {r.connections}: {r.error}" for r in results.runs if r.error]
    return ["## Skipped or failed", "", *problems, ""] if problems else []


def plot(path: Path, contenders: list[Contender], results: Results) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (rps_axis, p99_axis) = plt.subplots(1, 2, figsize=(11, 4.2))
    for contender in contenders:
        points = [(c, pick(results.of(contender.key, c))) for c in results.levels]
        points = [(c, r.load) for c, r in points if r is not None and r.load is not None]
        if not points:
            continue
        xs = [c for c, _ in points]
        rps_axis.plot(xs, [load.rps for _, load in points], marker="o", label=contender.label)
        p99_axis.plot(xs, [load.p99 * 1e3 for _, load in points], marker="o", label=contender.label)
    p99_axis.axhline(100, color="grey", linestyle="--", linewidth=1, label="target for ours at 64: 100 ms")
    for axis, title in ((rps_axis, "requests/s (log; higher is better)"), (p99_axis, "p99 latency, ms (log)")):
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xticks(results.levels, [str(c) for c in results.levels])
        axis.set_xlabel("concurrent connections")
        axis.set_title(title)
        axis.grid(alpha=0.3)
    rps_axis.legend(fontsize=8)
    p99_axis.legend(fontsize=8, loc="lower right", handles=p99_axis.get_lines()[-1:])
    figure.suptitle("Anomaly scoring of one 28x28 PNG per request, 2 shared cores")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write(prefix: Path, info: RunInfo, contenders: list[Contender], results: Results, floors: list[ComputeFloor],
          one_png_bytes: int) -> str:
    """Write PREFIX.md and PREFIX.png; returns the markdown."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    plot(prefix.with_suffix(".png"), contenders, results)
    lines = [*header(info, one_png_bytes), *targets(contenders, results, floors),
             *throughput(contenders, results, info.duration), f"![req/s and p99 by concurrency]({prefix.name}.png)", "",
             *batches(contenders, results, info.batch_duration), *compute_floor(floors),
             *http_floor(results, info.floor_bytes), *settings(contenders, results), *our_metrics(results),
             *every_run(contenders, results), *skipped(contenders, results)]
    text = "\n".join(lines)
    prefix.with_suffix(".md").write_text(text)
    return text
