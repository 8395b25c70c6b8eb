"""`saediff layers --base M --finetuned-adapter A B --prompts SRC --layers 0-29 --out DIR`."""
from __future__ import annotations

import argparse

from saediff.config import add_dataclass_args, config_from_args


def add_parser(sub: argparse._SubParsersAction) -> None:
    from saediff.diff.layers import LayersConfig

    p = sub.add_parser(
        "layers", help="per-layer directions of two or more fine-tunes, no SAE needed",
        description="Scan every requested block in one forward pass per model: the fine-tuned "
                    "− base mean difference, the misaligned − aligned mean difference "
                    "(labelled answers), the LoRA B vectors, their norms, the cosine of each "
                    "layer's direction across fine-tunes with bootstrap CIs, and the layer × "
                    "layer cosine matrix. Writes OUT/layers.json, OUT/directions.safetensors "
                    "and OUT/report.html.")
    p.add_argument("--config", help="YAML file with LayersConfig fields (flags override it)")
    add_dataclass_args(p, LayersConfig, defaults_none=True)
    p.add_argument("--no-html", action="store_true", help="skip report.html")
    p.set_defaults(func=run)


def _row(label: str, s: dict, k: int) -> str:
    v, lo, hi = s["value"][k], s["ci_low"][k], s["ci_high"][k]
    if v is None:
        return f"{label} —"
    return f"{label} {v:+.3f} [{lo:+.3f}, {hi:+.3f}]" if lo is not None else f"{label} {v:+.3f}"


def run(args: argparse.Namespace) -> int:
    from saediff.diff.layers import LayersConfig, run_layers
    from saediff.diff.layers_report import write_layers

    cfg = config_from_args(LayersConfig, args)
    res = run_layers(cfg)
    for k, layer in enumerate(res["layers"]):
        parts = [f"layer {layer:>2}"]
        parts += [f"|D| {f} {e['ft_minus_base_norm']['value'][k]:.3f}"
                  for f, e in res["finetunes"].items()]
        parts += [_row(f"cos({a['a']},{a['b']})", a["cos_ft_minus_base"], k) for a in res["across"]]
        print("  ".join(parts))
    if cfg.out:
        print(f"report written: {write_layers(res, cfg.out, html_report=not args.no_html)}")
    return 0
