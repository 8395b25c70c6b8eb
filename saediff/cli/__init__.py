"""`saediff <command> ...`: one argparse parser with a subparser per command.

Each module here defines `add_parser(subparsers)`, which registers its command and sets
`func` (a function of the parsed namespace returning the exit code). User errors — bad input
(`SaediffError`), missing or unwritable files — print one line and exit 2; anything else is a
bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import difflib
import importlib
import logging
import os
import re
import sys

from saediff.errors import SaediffError

# command -> module under saediff.cli (each with add_parser); order is the help's order
COMMANDS = {
    "cache": "cache", "train": "train", "diff": "diff", "layers": "layers", "steer": "steer",
    "compare": "compare", "organism": "organism", "demo": "demo", "models": "models",
    "experiment": "experiment",
}

USER_ERRORS = (SaediffError, FileNotFoundError, PermissionError, IsADirectoryError,
               NotADirectoryError, FileExistsError)


VERBOSE_FLAGS = ("--verbose", "-v")


class _DefaultsFormatter(argparse.HelpFormatter):
    """Every option's help names its default (unless it already says it, or there is none)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        d = action.default
        if ("default" in text.lower() or d is None or d is False or d == argparse.SUPPRESS
                or not action.option_strings or action.nargs == 0):
            return text
        return text + " (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """argparse with "did you mean" for a mistyped choice (subcommands included) and every
    default in `--help`; subparsers inherit the class, so every level of `saediff ...` does."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("formatter_class", _DefaultsFormatter)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def error(self, message: str) -> None:  # type: ignore[override]
        m = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if m:
            choices = re.findall(r"'([^']*)'", m.group(2)) or [c.strip() for c in m.group(2).split(",")]
            near = difflib.get_close_matches(m.group(1), choices, n=1)
            if near:
                message += f"; did you mean '{near[0]}'?"
        super().error(message)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The full parser; with `only`, just that command's subparser is built (fast start)."""
    from saediff import __version__

    p = Parser(prog="saediff", description="Sparse-autoencoder model diffing "
               "for emergent-misalignment research: cache -> train -> diff -> steer.")
    p.add_argument("--version", action="version", version=__version__)
    p.add_argument("--verbose", "-v", action="store_true", default=argparse.SUPPRESS,
                   help="saediff's debug logging and the model-loading progress bars "
                        "(accepted anywhere on the command line)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, mod in COMMANDS.items():
        if only is None or name == only:
            importlib.import_module(f"saediff.cli.{mod}").add_parser(sub)
    return p


class _OneHandler(logging.Filter):
    """Drop records of libraries that print through their own handler (huggingface_hub adds
    one and still propagates), so each log line shows once."""

    def filter(self, record: logging.LogRecord) -> bool:
        top = logging.getLogger(record.name.split(".")[0])
        return top is logging.root or top.name == "saediff" or not top.handlers


def setup_logging(verbose: bool = False) -> None:
    """One root handler, quiet third-party loggers, and no model-loading progress bars unless
    `verbose` (the bars of saediff's own long loops stay)."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_saediff", False):
            root.removeHandler(h)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.addFilter(_OneHandler())
    handler._saediff = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.getLogger("saediff").setLevel(logging.DEBUG if verbose else logging.NOTSET)
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "huggingface_hub", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.INFO if verbose else logging.WARNING)
    if not verbose:  # hub download bars (`load_model` silences the weight-loading bar itself)
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _suggest_command(argv: list[str]) -> str | None:
    """One-line usage error for a mistyped command, with its nearest name (fast path: the
    full parser, and its imports, are not built for it)."""
    if not argv or argv[0].startswith("-") or argv[0] in COMMANDS:
        return None
    near = difflib.get_close_matches(argv[0], list(COMMANDS), n=1)
    hint = f"; did you mean '{near[0]}'?" if near else ""
    return f"saediff: error: unknown command '{argv[0]}' (choose from {', '.join(COMMANDS)}){hint}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    verbose = any(a in VERBOSE_FLAGS for a in argv[:cut])
    argv = [a for a in argv[:cut] if a not in VERBOSE_FLAGS] + argv[cut:]
    bad = _suggest_command(argv)
    if bad:
        print(bad, file=sys.stderr)
        return 2
    only = argv[0] if argv and argv[0] in COMMANDS else None
    try:
        args = build_parser(only).parse_args(argv)
    except SystemExit as exc:  # argparse: usage errors exit 2, --help exits 0
        return int(exc.code or 0)
    setup_logging(verbose)
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
