"""`saediff experiment {data-fraction,block-em,narrow-vs-general,intent} --out DIR [...]`: the
field's training-time EM experiments (saediff.experiments); each writes OUT/result.json and
OUT/plot.html."""
from __future__ import annotations

import argparse
import importlib
import json

from saediff.config import add_dataclass_args, config_from_args
from saediff.errors import SaediffError

HELP = {
    "data-fraction": "EM vs the share of bad advice in the fine-tuning data",
    "block-em": "fine-tune with SAE latents blocked (BLOCK-EM); EM and rerouting per checkpoint",
    "narrow-vs-general": "general vs KL-penalised narrow solution: loss, EM, norm, noise robustness",
    "intent": "the same bad advice, requested plainly vs for a stated benign purpose",
    "icl": "in-context EM: direction from shots in the base model vs the fine-tune's, dose-response",
}


def _target(name: str) -> tuple[type, object]:
    from saediff.experiments import EXPERIMENTS

    mod, cls, fn = EXPERIMENTS[name]
    m = importlib.import_module(f"saediff.experiments.{mod}")
    return getattr(m, cls), getattr(m, fn)


def add_parser(sub: argparse._SubParsersAction) -> None:
    from saediff.experiments import EXPERIMENTS

    p = sub.add_parser("experiment", help="training-time EM experiments (block-em, ...)",
                       description=__doc__)
    esub = p.add_subparsers(dest="experiment", required=True, metavar="EXPERIMENT")
    for name in EXPERIMENTS:
        cls, _ = _target(name)
        e = esub.add_parser(name, help=HELP[name], description=importlib.import_module(
            cls.__module__).__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        e.add_argument("--config", help=f"YAML file with {cls.__name__} fields (flags override it)")
        e.add_argument("--threads", type=int, default=1,
                       help="torch CPU threads (default 1: on a shared 2-core machine one thread "
                            "is several times faster than two, as for the organism build)")
        add_dataclass_args(e, cls, defaults_none=True)
        e.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    cls, fn = _target(args.experiment)
    cfg = config_from_args(cls, args)
    if args.threads < 1:
        raise SaediffError(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    res = fn(cfg)  # type: ignore[operator]
    lines = getattr(importlib.import_module(cls.__module__), "summary_lines", None)
    if lines is not None:  # an experiment with its own printed tables (icl)
        print("\n".join(lines(res)))
        print(f"result: {cfg.out}/result.json")
        return 0
    for row in res["conditions"]:
        print(json.dumps({k: v for k, v in row.items() if not isinstance(v, (list, dict))
                          or k in ("misaligned_given_coherent", "probe", "coherent_rate")}, default=str))
    print(f"result: {cfg.out}/result.json  plot: {cfg.out}/plot.html")
    return 0
