"""`saediff experiment <name> ...`: the experiments of `saediff.experiments` (one subcommand each)."""
from __future__ import annotations

import argparse

from saediff.config import add_dataclass_args, build_config


def add_parser(sub: argparse._SubParsersAction) -> None:
    from saediff.experiments import EXPERIMENTS, experiment_module

    p = sub.add_parser("experiment", help="run an experiment that ties the stages together",
                       description="Experiments built on the stages; each writes OUT/result.json "
                                   "and a self-contained HTML plot.")
    ex = p.add_subparsers(dest="experiment", required=True, metavar="EXPERIMENT")
    for name in EXPERIMENTS:
        mod = experiment_module(name)
        q = ex.add_parser(name, help=mod.HELP, description=(mod.__doc__ or "").split("\n\n")[0])
        q.add_argument("--config", help="YAML file with the config's fields (flags override it)")
        add_dataclass_args(q, mod.CONFIG, defaults_none=True)
        q.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from saediff.experiments import experiment_module

    mod = experiment_module(args.experiment)
    ns = {k: v for k, v in vars(args).items() if k not in ("command", "func", "experiment")}
    cfg = build_config(mod.CONFIG, ns.pop("config"), ns)
    res = mod.run(cfg)
    print("\n".join(mod.summary_lines(res)))
    if getattr(cfg, "out", None):
        print(f"written: {cfg.out}/result.json")
    return 0
