"""`saediff compare --base M [--finetuned M | --finetuned-adapter A] --cache PAIRED.h5
--prompts SRC --methods sae,crosscoder,diff_sae,pca,mean_diff,lora_b [--sae RUN]
--judge organism|openai --out DIR`."""
from __future__ import annotations

import argparse

from saediff.config import add_dataclass_args, build_config


def add_parser(sub: argparse._SubParsersAction) -> None:
    from saediff.steer.leaderboard import CompareConfig

    p = sub.add_parser(
        "compare", help="score diffing methods against ground truth in one leaderboard",
        description="Run several model-diffing methods on one paired cache (SAE activation "
                    "shift, crosscoder, diff-SAE, PCA of differences, mean-diff, LoRA B) and "
                    "score each method's top direction: persona AUROC on labelled held-out "
                    "data, cosine to the LoRA B vector and the mean-diff direction, and the EM "
                    "rate / coherence when it is ablated in the fine-tuned model. Writes "
                    "OUT/leaderboard.json, OUT/summary.json and OUT/report.html.")
    p.add_argument("--config", help="YAML file with CompareConfig fields (flags override it)")
    add_dataclass_args(p, CompareConfig, defaults_none=True)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from saediff.steer.leaderboard import CompareConfig, run_compare

    ns = {k: v for k, v in vars(args).items() if k not in ("command", "func", "config")}
    cfg = build_config(CompareConfig, args.config, ns)
    res = run_compare(cfg)
    cols = ("method", "candidate", "auroc", "cos_lora_b", "cos_mean_diff", "em_rate_unsteered",
            "em_rate_steered", "coherent_rate_steered", "n")
    print("  ".join(cols))
    for r in res["leaderboard"]:
        print("  ".join(f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in cols))
    print(f"leaderboard: {cfg.out}/leaderboard.json  report: {cfg.out}/report.html")
    return 0
