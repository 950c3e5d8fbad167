"""What the anomaly benchmarks (defect_ceiling, texture_drift, segmenter_spread) share: where the
repository is, how a path, a command and the run that made a report read in it, and a run that
leaves the caller's torch settings as they were (the tests call the benchmarks in process)."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import torch

from training.report import training_machine

ROOT = Path(__file__).resolve().parent.parent


def shown(path: Path) -> str:
    """A path as a report shows it: relative to the repository when inside it."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def command_line(module: str, argv: list[str] | None) -> str:
    """The command a report says it came from: `python -m <module>` and its arguments."""
    return f"python -m {module} {shlex.join(sys.argv[1:] if argv is None else argv)}".strip()


def made_by(command: str, seconds: float) -> str:
    """A report's line on how it was made: the command, when, how long, and on which machine (its
    trainings would come out differently on another CPU)."""
    return (f"`{command}`, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {seconds:.0f} s in all, "
            f"on {training_machine()}.")


def comma_choices(parser: argparse.ArgumentParser, flag: str, value: str, allowed: Iterable[str]) -> tuple[str, ...]:
    """A comma-separated option's items, each one of `allowed`; else the parser's usage error."""
    items, allowed = tuple(item for item in value.split(",") if item), tuple(allowed)
    if not items or any(item not in allowed for item in items):
        parser.error(f"{flag} must be some of {', '.join(allowed)}; got {value!r}")
    return items


@contextmanager
def isolated(threads: int) -> Iterator[None]:
    """Run with `threads` torch threads and a forked random stream; restore both afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.random.fork_rng():
            yield
    finally:
        torch.set_num_threads(before)
