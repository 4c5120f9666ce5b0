"""The `vigil` command: one entry point for every service and chore.

Service packages contribute their own sub-commands (`add_commands(subparsers)`); they are imported only
when the command line is parsed, so `vigil --help` stays fast and nothing connects at import time.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = (
    "vigil.up",  # up
    "vigil_ingest.cli",  # ingest, replay
    "vigil_inference.cli",  # train, worker, serve-model
    "vigil_gateway.cli",  # gateway
    "vigil_bench.cli",  # bench
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vigil", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR (default INFO)")
    parser.add_argument("--log-format", default=None, choices=("text", "json"),
                        help="text (default) or json: one object per line with trace_id/span_id "
                             "(default: VIGIL_LOG_FORMAT, else text)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from vigil.telemetry import configure_logging

    configure_logging(args.log_level, args.log_format)
    result = args.func(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
