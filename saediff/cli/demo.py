"""`saediff demo [--quick] [--out DIR]`: the whole pipeline on the built-in organism."""
from __future__ import annotations

import argparse

from saediff.config import add_dataclass_args


def main(argv: list[str]) -> int:
    from saediff.demo import DemoConfig, format_summary, run_demo

    p = argparse.ArgumentParser(prog="saediff demo", description=__doc__)
    add_dataclass_args(p, DemoConfig)
    cfg = DemoConfig(**vars(p.parse_args(argv)))
    summary = run_demo(cfg, echo=lambda line: print(line, flush=True))
    print("\n=== saediff demo summary ===")
    print(format_summary(summary))
    print(f"\nwritten: {cfg.out}/summary.json, {cfg.out}/report.html  ({summary['seconds']:.0f} s)")
    return 0
