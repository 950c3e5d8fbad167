"""Command line: `python -m training train --data SOURCE --out PATH [options]`, and
`python -m training calibrate ARTIFACT [--score KIND] [--data SOURCE] [--out PATH] [--segmenter-steps N]
[--segmenter-levels 2|3] [--retrain-segmenter]`.

The options are generated from `TrainConfig`, one per field, with its default in --help.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import types
import typing
from dataclasses import MISSING, fields
from pathlib import Path

from .config import TrainConfig
from .scoring import SCORE_KINDS
from .segmenter import LEVEL_CHOICES


def _parse_ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from error
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _base_type(annotation: str) -> type | typing.Any:
    """The field's type without its `| None`, from the dataclass's string annotation."""
    hint = typing.get_type_hints(TrainConfig)[annotation]
    if isinstance(hint, types.UnionType):
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    return hint


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    for f in fields(TrainConfig):
        flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
        kind = _base_type(f.name)
        default = None if f.default is MISSING else f.default
        shown = "auto" if default is None else ",".join(map(str, default)) if isinstance(default, tuple) else default
        help_text = f"{f.metadata['help']} (default: {shown})"
        if kind is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default,
                                help=help_text)
        else:
            convert = _parse_ints if typing.get_origin(kind) is tuple else kind
            parser.add_argument(flag, dest=f.name, type=convert, default=default, help=help_text,
                                metavar=f.name.upper())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a VAE and export its artifact")
    add_train_arguments(train)
    calibrate = commands.add_parser("calibrate", help="recalibrate an artifact on known-good images, "
                                    "optionally switching its default score; no retraining")
    calibrate.add_argument("artifact", help="the artifact to recalibrate")
    calibrate.add_argument("--score", default=None, choices=SCORE_KINDS, metavar="KIND",
                           help=f"new default score: {', '.join(SCORE_KINDS)} (default: keep the artifact's)")
    calibrate.add_argument("--data", default=None, help="known-good images, any --data source of `train` "
                           "(default: the artifact's own calibration split)")
    calibrate.add_argument("--out", default=None, help="where to write (default: over the artifact)")
    calibrate.add_argument("--segmenter-steps", type=int, default=None, metavar="STEPS",
                           help="batches to train the defect segmenter for, when --score learned or fused "
                           "needs one the artifact lacks or --retrain-segmenter (default: 1500)")
    calibrate.add_argument("--segmenter-levels", type=int, default=None, choices=LEVEL_CHOICES,
                           help="resolutions a freshly trained defect segmenter works at: 2 (full and half), or "
                           "3, which adds a quarter and learns more per step (default: the artifact's, else 2)")
    calibrate.add_argument("--retrain-segmenter", action="store_true",
                           help="train a fresh defect segmenter in place of the artifact's (for --score learned "
                           "or fused); the VAE and the local statistics stay")
    report = commands.add_parser("report", help="(re)write an artifact's report folder (plots and index.html) "
                                 "without retraining")
    report.add_argument("artifact", help="the artifact, e.g. models/digits.pt; writes models/digits-report/")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        run(args, shlex.join(["python", "-m", "training", *argv]))
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def run(args: argparse.Namespace, command: str) -> None:
    """One subcommand; the heavy imports wait until one is chosen, so --help answers at once."""
    if args.command == "train":
        from .train import train

        train(TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)}), command=command)
    elif args.command == "calibrate":
        from .calibrate import calibrate, describe

        out = Path(args.out) if args.out else None
        metadata = calibrate(Path(args.artifact), out, args.score, args.data, command, args.segmenter_steps,
                             retrain_segmenter=args.retrain_segmenter, segmenter_levels=args.segmenter_levels)
        print(describe(metadata, out or args.artifact))
    elif args.command == "report":
        from .report import regenerate_report

        written = regenerate_report(Path(args.artifact))
        print(f"wrote {written[-1]} and {len(written) - 1} plots beside it")


if __name__ == "__main__":
    sys.exit(main())
