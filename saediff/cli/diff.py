"""`saediff diff --base M --finetuned M2 --sae RUN --layer L --prompts SRC --out DIR`."""
from __future__ import annotations

import argparse
import contextlib
from typing import Any

from saediff.config import add_dataclass_args, config_from_args
from saediff.errors import SaediffError
from saediff.io import output_lock

REQUIRED = ("base", "sae", "layer", "prompts")


def add_parser(sub: argparse._SubParsersAction) -> None:
    from saediff.diff.data import DiffConfig
    from saediff.judged import JudgeConfig

    p = sub.add_parser(
        "diff", help="rank SAE latents by activation shift base -> fine-tuned",
        description="Rank SAE latents by activation shift between a base and a fine-tuned model "
                    "(or two prompt conditions of one model), with bootstrap CIs, evidence per "
                    "latent, a comparison of candidate directions, and an HTML report. Several "
                    "--finetuned models or --finetuned-adapter checkpoints give a trajectory.")
    p.add_argument("--config", help="YAML file with DiffConfig fields (flags override it)")
    add_dataclass_args(p, DiffConfig, defaults_none=True)
    p.add_argument("--no-html", action="store_true", help="skip report.html")
    # the shared judge fields; given, the judge labels sampled responses (misaligned /
    # aligned), which adds the misaligned - aligned difference-in-means direction
    add_dataclass_args(p, JudgeConfig, defaults_none=True)
    p.add_argument("--layers", help="diff several layers (6,12,18 or 0-29), each with its own SAE "
                                    "--sae/layer_<L> (from `saediff train --layers`); reports in "
                                    "--out/layer_<L>/ and a summary table (replaces --layer)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from saediff.diff.data import DiffConfig
    from saediff.judged import JudgeConfig

    ns = {k: v for k, v in vars(args).items() if k in ("layer", "layers")}
    layers = _layers(ns)
    if args.config is None:
        missing = [f"--{n.replace('_', '-')}" for n in REQUIRED
                   if (ns if n == "layer" else vars(args)).get(n) is None]
        if missing:
            raise SaediffError(f"the following arguments are required: {', '.join(missing)}")
    cfg = config_from_args(DiffConfig, args, {"layer": ns["layer"]})
    no_html, labeler = args.no_html, None
    if args.judge not in (None, "none"):
        from saediff.judges import judge_labeler

        if cfg.responses_from not in ("base", "finetuned"):
            raise SaediffError("--judge labels sampled responses; add --responses-from base|finetuned")
        judge = config_from_args(JudgeConfig, args, yaml_path=None).make_judge()
        labeler = judge_labeler(judge)
    # one writer per --out, from before the models load until the last report file lands
    with output_lock(cfg.out) if cfg.out else contextlib.nullcontext():
        return _run(cfg, labeler, no_html, layers)


def _run(cfg: Any, labeler: Any, no_html: bool, layers: list[int] | None) -> int:
    if layers:
        from saediff.diff.per_layer import format_summary, run_diff_layers
        from saediff.layerspec import check_layer_range, config_n_layers

        check_layer_range(layers, config_n_layers(cfg.base), cfg.base)
        rows = run_diff_layers(cfg, layers, labeler=labeler, html=not no_html)
        print(format_summary(rows))
        if cfg.out:
            print(f"reports written: {cfg.out}/layer_<L>/, summary {cfg.out}/layers_summary.csv")
        return 0
    from saediff.diff.differ import run_diff

    res = run_diff(cfg, labeler=labeler)
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


def _layers(ns: dict) -> list[int] | None:
    """--layers parsed; it stands in for --layer (each layer's run sets its own)."""
    spec = ns.pop("layers", None)
    if spec is None:
        return None
    from saediff.layerspec import parse_layers

    if ns.get("layer") is not None:
        raise SaediffError("give --layer or --layers, not both")
    layers = parse_layers(spec)
    ns["layer"] = layers[0]
    return layers
