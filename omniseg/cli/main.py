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
    from omniseg import __version__

    parser = argparse.ArgumentParser(prog="omniseg", description="Universal image segmentation.")
    parser.add_argument("--version", action="version", version=f"omniseg {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in COMMANDS.items():
        importlib.import_module(module).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(importlib.import_module(COMMANDS[args.command]).run(args))
    except KeyboardInterrupt:
        # Ctrl-C is how a user stops a long run: say so in one line, not a traceback. Every
        # file is written atomically, so what is on disk is whole (segment re-runs skip the
        # finished images; train continues with --resume). 130 = 128 + SIGINT, as shells use.
        print(f"\nomniseg {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
