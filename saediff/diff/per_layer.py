"""The SAE diff at several layers (`saediff diff --layers 6,12,18 --sae RUNS`): one ranking per
layer, each with its own SAE (RUNS/layer_<L>/, as `saediff train --layers` writes them), and one
summary table — per layer the top latent, its shift and CI, and its decoder's cosine to that
layer's fine-tuned − base mean difference, the labelled misaligned − aligned one and LoRA B.
"""
from __future__ import annotations

import csv
import dataclasses
import io
from pathlib import Path
from typing import Any

from saediff.diff.data import DiffConfig, Labeler
from saediff.errors import SaediffError
from saediff.layerspec import layer_dir

SUMMARY_FIELDS = ("layer", "sae", "top_latent", "mean_shift", "ci_low", "ci_high", "significant",
                  "cos_ft_minus_base", "cos_misaligned_minus_aligned", "abs_cos_lora_b", "n_tokens")


def layer_sae(sae_root: str | Path, layer: int) -> Path:
    """The SAE of one layer: ROOT/layer_<L> (a multi-layer training run)."""
    p = layer_dir(sae_root, layer)
    if not (p / "cfg.json").is_file():
        raise FileNotFoundError(f"no SAE for layer {layer}: {p} has no cfg.json (train one per "
                                "layer with `saediff train --layers ...`, then pass its --out as "
                                "--sae)")
    return p


def _cos(d: dict[str, Any], a: str, prefix: str) -> float | None:
    names = d.get("names", [])
    if a not in names:
        return None
    i = names.index(a)
    hits = [abs(d["cosines"][i][j]) if prefix == "lora_B" else d["cosines"][i][j]
            for j, n in enumerate(names) if n.startswith(prefix)]
    return max(hits) if hits else None


def summary_row(layer: int, sae: Path, res: Any) -> dict[str, Any]:
    top = res.table[0]
    name = f"latent {top['latent']}"
    d = res.directions
    return {"layer": layer, "sae": str(sae), "top_latent": top["latent"],
            "mean_shift": top["mean_shift"], "ci_low": top["ci_low"], "ci_high": top["ci_high"],
            "significant": top["significant"],
            "cos_ft_minus_base": _cos(d, name, "diff-in-means (finetuned-base)"),
            "cos_misaligned_minus_aligned": _cos(d, name, "diff-in-means (misaligned-aligned"),
            "abs_cos_lora_b": _cos(d, name, "lora_B"), "n_tokens": res.meta.get("n_tokens")}


def run_diff_layers(cfg: DiffConfig, layers: list[int], labeler: Labeler | None = None,
                    html: bool = True) -> list[dict[str, Any]]:
    """`run_diff` at each layer with that layer's SAE; reports to OUT/layer_<L>/ and the summary
    to OUT/layers_summary.{json,csv}. Every layer's SAE is found before any model runs."""
    from saediff.diff.differ import run_diff
    from saediff.io import check_writable_dir, write_json, write_text

    saes = {x: layer_sae(cfg.sae, x) for x in layers}
    if cfg.out:
        check_writable_dir(cfg.out)
    rows = []
    for x in layers:
        sub = dataclasses.replace(cfg, layer=x, sae=str(saes[x]),
                                  out=str(layer_dir(cfg.out, x)) if cfg.out else None)
        res = run_diff(sub, labeler=labeler)
        if sub.out:
            res.to_dir(sub.out, html=html)
        rows.append(summary_row(x, saes[x], res))
    if not rows:
        raise SaediffError("--layers: no layers to diff")
    if cfg.out:
        write_json(Path(cfg.out) / "layers_summary.json", rows)
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(SUMMARY_FIELDS))
        w.writeheader()
        w.writerows(rows)
        write_text(Path(cfg.out) / "layers_summary.csv", buf.getvalue())
    return rows


def format_summary(rows: list[dict[str, Any]]) -> str:
    def f(v: Any) -> str:
        return "    —" if v is None else f"{v:+.3f}"

    lines = [f"{'layer':>5} {'latent':>7} {'shift':>8} {'95% CI':>19} {'cos D':>7} {'cos M':>7} "
             f"{'|cos B|':>7}"]
    for r in rows:
        lines.append(f"{r['layer']:>5} {r['top_latent']:>7} {r['mean_shift']:>8.4f} "
                     f"[{r['ci_low']:>8.4f},{r['ci_high']:>8.4f}] {f(r['cos_ft_minus_base']):>7} "
                     f"{f(r['cos_misaligned_minus_aligned']):>7} {f(r['abs_cos_lora_b']):>7}")
    return "\n".join(lines)
