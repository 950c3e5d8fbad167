"""Serving benchmark: our service against a naive FastAPI endpoint, LitServe and TorchServe on the
same 28x28 conv VAE and the same workload, beside an HTTP floor and a compute floor, in one run.

Run from the repository root:  .venv/bin/python -m benchmarks.serving [--rounds 3] [--vae-env VAE_KEY=VALUE]

Each contender is started alone (2 cores), warmed up, loaded by wrk (one thread, N connections)
with one Fashion-MNIST PNG per request, and stopped; the contenders take turns in a rotating
order at each concurrency, so drift in the machine's load touches all of them. LitServe and
TorchServe are installed on first use into benchmarks/serving/.venvs/ (git-ignored; torch pinned
to the project's CPU build); wrk comes from Debian's package (installed with apt-get when missing
and running as root). Peers that cannot be installed or started are skipped and say why. One
round takes about 6-8 minutes. Writes benchmarks/results/serving.md and .png.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import time
from pathlib import Path

from . import compute, report, workload
from .contenders import PROJECT_ROOT, Setup, build
from .load import ensure_wrk, wrk_version
from .session import Results, expected_response_bytes, run_session

DEFAULT_MODEL = PROJECT_ROOT / "models" / "fashion.pt"
WORKDIR = Path(__file__).resolve().parent / "work"
RESULTS = PROJECT_ROOT / "benchmarks" / "results" / "serving"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serving",
                                     description="Serving benchmark: ours against a naive FastAPI app, LitServe "
                                                 "and TorchServe, with HTTP and compute floors.")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL,
                        help="the 28x28 VAE artifact (default models/fashion.pt)")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per run (default 10)")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each run (default 2)")
    parser.add_argument("--concurrency", default="1,16,64", help="connection counts (default 1,16,64)")
    parser.add_argument("--rounds", type=int, default=1, help="times through every level (default 1)")
    parser.add_argument("--batch-duration", type=float, default=5.0,
                        help="seconds of back-to-back 64-image requests on one connection (default 5)")
    parser.add_argument("--only", default="", help="comma-separated contenders: ours,naive,litserve,torchserve,"
                                                   "http-floor,http-floor-uvloop (default all)")
    parser.add_argument("--vae-env", action="append", default=[], metavar="VAE_KEY=VALUE",
                        help="extra setting for our service (repeatable)")
    parser.add_argument("--litserve-fast-queue", action="store_true", help="LitServer(fast_queue=True) (ZeroMQ)")
    parser.add_argument("--peer-torch-threads", type=int, default=0,
                        help="torch threads for the naive app and LitServe (default 0: torch's default)")
    parser.add_argument("--image-index", type=int, default=0, help="first Fashion-MNIST test image used (default 0)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results prefix: writes .md and .png "
                                                                  "(default benchmarks/results/serving)")
    args = parser.parse_args(argv)
    args.levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    bad = [item for item in args.vae_env if "=" not in item or not item.startswith("VAE_")]
    if bad:
        parser.error(f"--vae-env takes VAE_KEY=VALUE, got {bad}")
    return args


def round_floors(model: Path, pngs: list[bytes], round_index: int, when: str) -> list[compute.ComputeFloor]:
    """The compute floor right before and after a round's lowest concurrency: the 1-connection
    target divides by the floor of the same minutes, since the machine's speed drifts by more than
    the margin between 1.5x and what we measure (benchmarks/results/serving-1622-fused.md)."""
    print(f"measuring the compute floor ({when} round {round_index + 1}'s lowest concurrency)", flush=True)
    return [compute.measure(model, pngs, threads, budget_s=1.0, when=f"round {round_index + 1}, {when}",
                            round_index=round_index) for threads in (1, 2)]


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # a killed run (or one started in the background, where SIGINT is ignored) still stops its server
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _interrupt)
    started, load_start = time.time(), os.getloadavg()[0]
    if not args.model.is_file():
        print(f"no model at {args.model}; train a stand-in with\n  .venv/bin/python -m training train --data "
              "fashion-mnist --out /tmp/bench-fashion/fashion.pt --epochs 1 --quiet --no-report\nand pass --model")
        return 2
    wrk = ensure_wrk()
    shutil.rmtree(WORKDIR, ignore_errors=True)
    pngs = workload.fashion_pngs(args.image_index)
    bodies = workload.write_bodies(WORKDIR, pngs)
    print(f"model {args.model}; 1-min load average {load_start:.2f}; measuring the compute floor", flush=True)
    # at 1 and at 2 torch threads: on a busy machine two OpenMP threads can be much slower than one
    floors = [compute.measure(args.model, pngs, threads) for threads in (1, 2)]
    setup = Setup(args.model.resolve(), WORKDIR, expected_response_bytes(args.model, pngs[0]),
                  dict(item.split("=", 1) for item in args.vae_env), args.litserve_fast_queue,
                  args.peer_torch_threads)
    print("preparing contenders (peer venvs on first use)", flush=True)
    contenders = build(setup, WORKDIR / "install.log")
    if args.only:
        chosen = set(args.only.split(","))
        contenders = [c for c in contenders if c.key in chosen]
    for contender in contenders:
        if contender.skip_reason:
            print(f"  SKIP {contender.label}: {contender.skip_reason}", flush=True)
    results = Results(args.levels)
    for round_index in range(args.rounds):
        for level_index, connections in enumerate(args.levels):
            active = [c for c in contenders if not c.skip_reason]
            shift = (round_index * len(args.levels) + level_index) % max(len(active), 1)
            lowest = connections == min(args.levels)
            if lowest:
                floors += round_floors(args.model, pngs, round_index, "before")
            for contender in active[shift:] + active[:shift]:
                run_session(contender, setup, bodies, wrk, connections, args, results, round_index)
            if lowest:
                floors += round_floors(args.model, pngs, round_index, "after")
    # again at the end, against the machine's mood at the start: the smallest counts (a floor)
    print("measuring the compute floor again", flush=True)
    floors += [compute.measure(args.model, pngs, threads, when="end") for threads in (1, 2)]
    info = report.RunInfo(started=started, finished=time.time(), load_start=load_start, load_end=os.getloadavg()[0],
                          command=" ".join(["python -m benchmarks.serving", *(argv or sys.argv[1:])]),
                          wrk=wrk_version(wrk), model=args.model, duration=args.duration, warmup=args.warmup,
                          batch_duration=args.batch_duration, rounds=args.rounds, floor_bytes=setup.floor_bytes)
    text = report.write(args.out, info, contenders, results, floors, len(pngs[0]))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
