"""`saediff demo [--quick] [--out DIR]`: the whole pipeline on the built-in organism."""
from __future__ import annotations

import argparse

from saediff.config import add_dataclass_args, build_config


def add_parser(sub: argparse._SubParsersAction) -> None:
    from saediff.demo import DemoConfig

    p = sub.add_parser("demo", help="run the whole pipeline on the built-in organism",
                       description=__doc__)
    add_dataclass_args(p, DemoConfig)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from saediff.demo import DemoConfig, format_summary, run_demo

    cfg = build_config(DemoConfig, None, {k: v for k, v in vars(args).items()
                                          if k in DemoConfig.__dataclass_fields__})
    summary = run_demo(cfg, echo=lambda line: print(line, flush=True))
    print("\n=== saediff demo summary ===")
    print(format_summary(summary))
    print(f"\nwrote {cfg.out}/summary.json, {cfg.out}/report.html  ({summary['seconds']:.0f} s)")
    return 0
