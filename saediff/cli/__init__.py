"""`saediff <stage> ...`: a thin dispatcher; each stage's options live in its own module here."""
from __future__ import annotations

import importlib
import logging
import os
import sys

COMMANDS = {
    "cache": ("saediff.cli.cache", "stream one layer's activations of one or two models to HDF5"),
    "train": ("saediff.cli.train", "train SAEs on a cache from a YAML config"),
    "diff": ("saediff.cli.diff", "rank SAE latents by activation shift base -> fine-tuned"),
    "steer": ("saediff.cli.steer", "clamp / add / ablate a latent during generation and judge it"),
    "organism": ("saediff.cli.organism", "the built-in toy model organism of emergent misalignment"),
    "demo": ("saediff.cli.demo", "run the whole pipeline on the built-in organism"),
}

USAGE = "usage: saediff {" + ",".join(COMMANDS) + "} ...\n\n" + "\n".join(
    f"  {name:<9} {help_}" for name, (_, help_) in COMMANDS.items())


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] == "--version":
        from saediff import __version__
        print(__version__)
        return 0
    name = argv[0]
    if name not in COMMANDS:
        print(f"saediff: unknown command {name!r}\n{USAGE}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    module = importlib.import_module(COMMANDS[name][0])
    try:
        return int(module.main(argv[1:]) or 0)
    except BrokenPipeError:  # e.g. `saediff cache info F | head`
        sys.stdout = open(os.devnull, "w")
        return 0
    except (ValueError, FileNotFoundError, KeyError, FileExistsError, RuntimeError) as exc:
        # SaediffError is a ValueError: bad input gets one line, no traceback.
        print(f"saediff {name}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
