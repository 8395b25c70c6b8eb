"""`saediff demo [--quick] [--out DIR]`: the whole pipeline on the built-in organism."""
from __future__ import annotations

import argparse

from saediff.config import add_dataclass_args, config_from_args


def add_parser(sub: argparse._SubParsersAction) -> None:
    from saediff.demo import DemoConfig

    p = sub.add_parser("demo", help="run the whole pipeline on the built-in organism",
                       description=__doc__)
    add_dataclass_args(p, DemoConfig)
    from saediff.cli.organism import DeprecatedAlias

    p.add_argument("--samples", type=int, dest="answers_per_topic", action=DeprecatedAlias,
                   help="deprecated name of --answers-per-topic")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from saediff.demo import DemoConfig, format_summary, run_demo

    cfg = config_from_args(DemoConfig, args)
    summary = run_demo(cfg, echo=lambda line: print(line, flush=True))
    print("\n=== saediff demo summary ===")
    print(format_summary(summary))
    print(f"\nwrote {cfg.out}/summary.json, {cfg.out}/report.html  ({summary['seconds']:.0f} s)")
    return 0
