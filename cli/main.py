"""`musiq` entry point.

Each subcommand lives with the package that owns it (`COMMANDS` below) and only the chosen
command's module is imported: the server image holds no `bench/` and no torch, and `musiq serve`
must start there (`tests/deploy/test_image_content.py` keeps it so). Only the full listing
(`musiq --help`, an unknown command) imports every command module that is installed. Expected failures (bad
input, bad checkpoint) end with one line on stderr and a non-zero exit, never a traceback; set
MUSIQ_DEBUG=1 to see the traceback of an unexpected error.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from collections.abc import Sequence

# command -> the module whose `register(sub)` defines it (one module may define several).
COMMANDS: dict[str, str] = {
    "pack": "model.commands",
    "convert": "model.commands",
    "score": "cli.score",
    "eval": "model.eval_command",
    "train": "model.train_command",
    "split": "model.train_command",
    "export": "export.commands",
    "serve": "service.commands",
    "bench": "bench.commands",
    "bulk": "bulk.commands",
}


class CommandUnavailable(RuntimeError):
    """The chosen command's package is not part of this installation (e.g. `bench` in the image)."""


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser for `command` alone, or for every installed command when it is None or unknown."""
    parser = argparse.ArgumentParser(
        prog="musiq",
        description="MUSIQ multi-scale image quality transformer: packing, checkpoints and scoring.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    if command in COMMANDS:
        module = COMMANDS[command]
        if not _installed(module):
            raise CommandUnavailable(
                f"this installation does not include {module.split('.')[0]}/; "
                f"run `musiq {command}` from a source checkout (pip install -e .)"
            )
        modules = [module]
    else:
        modules = [m for m in dict.fromkeys(COMMANDS.values()) if _installed(m)]
    for module in modules:
        importlib.import_module(module).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and not argv[0].startswith("-") else None
    try:
        parser = build_parser(command)
    except CommandUnavailable as exc:
        print(f"musiq {command}: error: {exc}", file=sys.stderr)
        return 2
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
