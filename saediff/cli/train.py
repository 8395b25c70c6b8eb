"""`saediff train --config FILE.yaml [--cache FILE.h5 ...] [--out DIR] [--field value ...]`."""
from __future__ import annotations

import argparse
import json
from typing import Any

from saediff.config import add_dataclass_args, config_from_args, load_yaml
from saediff.errors import SaediffError


def add_parser(sub: argparse._SubParsersAction) -> None:
    from saediff.train.config import TrainConfig

    p = sub.add_parser(
        "train", help="train SAEs on a cache, or --live straight from the model(s)",
        description="Train SAELens SAEs (TopK, BatchTopK, standard L1, JumpReLU, ...) or a "
                    "crosscoder on one layer's activations: out of an HDF5 cache (--cache), "
                    "or --live from the model(s) run on the documents (the model/document "
                    "options of `saediff cache`; nothing but the run directory is written). "
                    "Resumes from OUT/checkpoints when present. Flags override the YAML.")
    p.add_argument("--config", help="YAML file with TrainConfig fields (see configs/)")
    add_dataclass_args(p, TrainConfig, defaults_none=True, skip=("sweep", "sae_kwargs"))
    p.add_argument("--no-evals", action="store_true", help="skip evals.json (quick runs)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from saediff.train.loop import TrainConfig, train

    ns = {k: v for k, v in vars(args).items() if k not in ("command", "func", "config", "no_evals")}
    yaml_path, values = _live_replaces_yaml_cache(args.config, ns)
    cfg = config_from_args(TrainConfig, args, values, yaml_path=yaml_path)
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


def _live_replaces_yaml_cache(config: str | None, ns: dict[str, Any]
                              ) -> tuple[str | None, dict[str, Any]]:
    """`--live` on the command line replaces the YAML's `cache:` (flags override the YAML);
    --live with --cache on the command line (or live: true with cache: in one YAML) is refused."""
    if not ns.get("live") or ns.get("cache") is not None or config is None:
        return config, ns
    values = load_yaml(config)
    if not isinstance(values, dict):
        raise SaediffError(f"{config}: expected a mapping of config fields at top level")
    values.pop("cache", None)
    return None, {**values, **{k: v for k, v in ns.items() if v is not None}}
