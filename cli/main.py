"""`musiq` entry point.

Each subcommand lives with the package that owns it (`model.commands`: pack / convert / score;
`export.commands`: export; `service.commands`: serve; `bench.commands`: bench)
and is imported only when chosen, so `musiq pack` never loads torch. Expected failures (bad
input, bad checkpoint) end with one line on stderr and a non-zero exit, never a traceback; set
MUSIQ_DEBUG=1 to see the traceback of an unexpected error.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from bench import commands as bench_commands
from export import commands as export_commands
from model import commands as model_commands
from model import eval_command, train_command
from service import commands as service_commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="musiq",
        description="MUSIQ multi-scale image quality transformer: packing, checkpoints and scoring.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    model_commands.register(sub)
    eval_command.register(sub)
    train_command.register(sub)
    export_commands.register(sub)
    service_commands.register(sub)
    bench_commands.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print("musiq: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if os.environ.get("MUSIQ_DEBUG"):
            raise
        message = str(exc).strip() or type(exc).__name__
        print(f"musiq {args.command}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
