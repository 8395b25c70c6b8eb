"""`saediff <command> ...`: one argparse parser with a subparser per command.

Each module here defines `add_parser(subparsers)`, which registers its command and sets
`func` (a function of the parsed namespace returning the exit code). User errors — bad input
(`SaediffError`), missing or unwritable files — print one line and exit 2; anything else is a
bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from saediff.errors import SaediffError

# command -> module under saediff.cli (each with add_parser); order is the help's order
COMMANDS = {
    "cache": "cache", "train": "train", "diff": "diff", "layers": "layers", "steer": "steer",
    "compare": "compare", "organism": "organism", "demo": "demo", "models": "models",
}

USER_ERRORS = (SaediffError, FileNotFoundError, PermissionError, IsADirectoryError,
               NotADirectoryError, FileExistsError)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The full parser; with `only`, just that command's subparser is built (fast start)."""
    from saediff import __version__

    p = argparse.ArgumentParser(prog="saediff", description="Sparse-autoencoder model diffing "
                                "for emergent-misalignment research: cache -> train -> diff -> steer.")
    p.add_argument("--version", action="version", version=__version__)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, mod in COMMANDS.items():
        if only is None or name == only:
            importlib.import_module(f"saediff.cli.{mod}").add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    only = argv[0] if argv and argv[0] in COMMANDS else None
    try:
        args = build_parser(only).parse_args(argv)
    except SystemExit as exc:  # argparse: usage errors exit 2, --help exits 0
        return int(exc.code or 0)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # e.g. `saediff cache info F | head`
        sys.stdout = open(os.devnull, "w")
        return 0
    except USER_ERRORS as exc:
        msg = str(exc) if isinstance(exc, SaediffError) or not getattr(exc, "filename", None) \
            else f"{exc.strerror or exc}: {exc.filename}"
        print(f"saediff {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
