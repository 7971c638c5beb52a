"""``omniseg COMMAND ...``: each command lives in its own module with ``add_parser`` and ``run``."""

from __future__ import annotations

import argparse
import importlib
import sys

# command name -> module defining add_parser(subparsers) and run(args) -> exit status
COMMANDS = {
    "segment": "omniseg.cli.segment",
    "evaluate": "omniseg.cli.evaluate",
    "train": "omniseg.cli.train",
    "serve": "omniseg.cli.serve",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="omniseg", description="Universal image segmentation.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in COMMANDS.items():
        importlib.import_module(module).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(importlib.import_module(COMMANDS[args.command]).run(args))


if __name__ == "__main__":
    sys.exit(main())
