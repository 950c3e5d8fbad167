"""`python -m service --model PATH --host H --port P`: serve an artifact with uvicorn.

Options override the VAE_* environment variables they mirror (see service/settings.py)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

import uvicorn

from .settings import Settings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m service", description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="artifact to serve (VAE_MODEL_PATH; default: models/digits.pt)")
    parser.add_argument("--host", help="interface (VAE_HOST; default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (VAE_PORT; default 8000)")
    parser.add_argument("--workers", type=int, help="processes (VAE_WORKERS; default 1)")
    parser.add_argument("--log-level", help="VAE_LOG_LEVEL (default info)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = {"model_path": args.model, "host": args.host, "port": args.port, "workers": args.workers,
                 "log_level": args.log_level}
    for field, value in overrides.items():
        if value is not None:
            os.environ[f"VAE_{field.upper()}"] = str(value)      # worker processes read settings from here
    settings = Settings()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run("service.app:create_app", factory=True, host=settings.host, port=settings.port,
                workers=settings.workers, log_level=settings.log_level, access_log=False,
                timeout_graceful_shutdown=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
