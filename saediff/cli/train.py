"""`saediff train --config FILE.yaml [--cache FILE.h5 ...] [--out DIR] [--field value ...]`."""
from __future__ import annotations

import argparse
import json

from saediff.config import add_dataclass_args, build_config


def add_parser(sub: argparse._SubParsersAction) -> None:
    from saediff.train.loop import TrainConfig

    p = sub.add_parser(
        "train", help="train SAEs on a cache from a YAML config",
        description="Train SAELens SAEs (TopK, BatchTopK, standard L1, JumpReLU, ...) on one "
                    "layer's activations out of an HDF5 cache, without re-running the model. "
                    "Resumes from OUT/checkpoints when present. Flags override the YAML.")
    p.add_argument("--config", help="YAML file with TrainConfig fields (see configs/)")
    add_dataclass_args(p, TrainConfig, defaults_none=True, skip=("sweep", "sae_kwargs"))
    p.add_argument("--no-evals", action="store_true", help="skip evals.json (quick runs)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from saediff.train.loop import TrainConfig, train

    ns = {k: v for k, v in vars(args).items() if k not in ("command", "func", "config", "no_evals")}
    cfg = build_config(TrainConfig, args.config, ns)
    run_dirs = train(cfg, evals=not args.no_evals)
    for d in run_dirs:
        line = f"SAE saved: {d}"
        ev = d / "evals.json"
        if ev.is_file():
            res = json.loads(ev.read_text())
            line += "  " + "  ".join(
                f"{s}: FVU {r['fvu']:.3f} L0 {r['l0']:.1f} dead {r['dead_frac']:.2f}"
                + (f" dLoss {r['delta_loss']:.3f}" if r.get("delta_loss") is not None else "")
                for s, r in res.items())
        print(line)
    return 0
