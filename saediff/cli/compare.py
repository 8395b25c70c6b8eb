"""`saediff compare --base M [--finetuned M | --finetuned-adapter A] --cache PAIRED.h5
--prompts SRC --methods sae,crosscoder,diff_sae,pca,mean_diff,lora_b [--sae RUN]
--judge organism|openai --out DIR`."""
from __future__ import annotations

import argparse

from saediff.config import add_dataclass_args, config_from_args


def add_parser(sub: argparse._SubParsersAction) -> None:
    from saediff.compare import CompareConfig

    p = sub.add_parser(
        "compare", help="score diffing methods against ground truth in one leaderboard",
        description="Run several model-diffing methods on one paired cache (SAE activation "
                    "shift, crosscoder, diff-SAE, PCA of differences, mean-diff, LoRA B) and "
                    "score each method's top direction: persona AUROC on labelled held-out "
                    "data, cosine to the LoRA B vector and the mean-diff direction, and the EM "
                    "rate / coherence when it is ablated in the fine-tuned model. Writes "
                    "OUT/compare.json, OUT/summary.json and OUT/report.html.")
    p.add_argument("--config", help="YAML file with CompareConfig fields (flags override it)")
    add_dataclass_args(p, CompareConfig, defaults_none=True)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from saediff.compare import CompareConfig, run_compare
    from saediff.compare.report import BOARD_COLUMNS

    cfg = config_from_args(CompareConfig, args)
    res = run_compare(cfg)
    cols = BOARD_COLUMNS
    print("  ".join(cols))
    for r in res["leaderboard"]:
        print("  ".join(f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in cols))
    print(f"board: {cfg.out}/compare.json  report: {cfg.out}/report.html")
    return 0
