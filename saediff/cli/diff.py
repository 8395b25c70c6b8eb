"""`saediff diff --base M --finetuned M2 --sae RUN --layer L --prompts SRC --out DIR`."""
from __future__ import annotations

import argparse

from saediff.config import add_dataclass_args, build_config

REQUIRED = ("base", "sae", "layer", "prompts")


def main(argv: list[str]) -> int:
    from saediff.diff import run_diff
    from saediff.diffdata import DiffConfig

    p = argparse.ArgumentParser(
        prog="saediff diff",
        description="Rank SAE latents by activation shift between a base and a fine-tuned model "
                    "(or two prompt conditions of one model), with bootstrap CIs, evidence per "
                    "latent, a comparison of candidate directions, and an HTML report. Several "
                    "--finetuned models or --finetuned-adapter checkpoints give a trajectory.")
    p.add_argument("--config", help="YAML file with DiffConfig fields (flags override it)")
    add_dataclass_args(p, DiffConfig, defaults_none=True)
    p.add_argument("--no-html", action="store_true", help="skip report.html")
    ns = vars(p.parse_args(argv))
    cfg_path, no_html = ns.pop("config"), ns.pop("no_html")
    if cfg_path is None:
        missing = [f"--{n.replace('_', '-')}" for n in REQUIRED if ns.get(n) is None]
        if missing:
            p.error(f"the following arguments are required: {', '.join(missing)}")
    cfg = build_config(DiffConfig, cfg_path, ns)
    res = run_diff(cfg)
    print(res.format_table(cfg.top_k))
    if res.directions.get("names"):
        d = res.directions
        dec = [i for i, k in enumerate(d["kinds"]) if k == "decoder"][:3]
        other = [i for i, k in enumerate(d["kinds"]) if k != "decoder"]
        pairs = [(i, j) for n, i in enumerate(other) for j in other[n + 1:] + dec]
        for i, j in pairs:
            print(f"cos({d['names'][i]}, {d['names'][j]}) = {d['cosines'][i][j]:+.3f}")
        for name, fr in d.get("span_explained", {}).items():
            print(f"span of top-k decoders explains {name}: "
                  + ", ".join(f"k={k}: {v:.3f}" for k, v in fr.items()))
    if cfg.out:
        out = res.to_dir(cfg.out, html=not no_html)
        print(f"report written: {out}")
    return 0
