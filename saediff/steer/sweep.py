"""`saediff steer sweep`: EM rate and coherence per steering coefficient.

    res = run_sweep(SweepConfig(model=M, sae=RUN, latent=[j], mode="clamp",
                                coefs=[0, 2, 4, 8], prompts="organism:untrained", out=DIR))
    res["strongest"]   # strongest setting whose coherent rate stays above the threshold

The rerouting check lives in `saediff.steer.reroute`, the toy organism's causal check in
`saediff.organism.causal`.
"""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from saediff.errors import SaediffError
from saediff.io import atomic_path, check_writable_dir, output_lock, staged_outputs, write_json, write_jsonl
from saediff.judged import judged_generation
from saediff.prompts import load_prompt_items
from saediff.sae import load_sae, require_activation_sae
from saediff.steer.evaluate import SteerConfig, steer_context
from saediff.steer.hooks import check_latents

log = logging.getLogger(__name__)


@dataclass
class SweepConfig(SteerConfig):
    """Configuration of `saediff steer sweep`."""

    mode: Literal["clamp", "add"] = "clamp"
    """Steering mode swept: clamp the latent(s) to each value, or add each multiple."""
    coefs: list[float] = field(default_factory=lambda: [0.0, 1.0, 2.0, 4.0, 8.0])
    """Coefficients (clamp values or add multiples) to sweep."""
    goal: Literal["reduce", "induce"] = "reduce"
    """What the strongest setting should do to the misalignment rate."""
    coherence_threshold: float | None = None
    """Minimum coherent rate a setting must keep (default: the unsteered rate minus 0.10)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.sae or not self.latent:
            raise SaediffError("sae and latent are required for a sweep")
        if not self.coefs:
            raise SaediffError("coefs must list at least one coefficient")
        bad = [c for c in self.coefs if not math.isfinite(float(c))]
        if bad:
            raise SaediffError(f"--coefs must be finite numbers, got {bad}")
        if self.coherence_threshold is not None and not 0 <= self.coherence_threshold <= 1:
            raise SaediffError(f"coherence_threshold must be in [0, 1], got {self.coherence_threshold}")


def _clean(x: Any) -> Any:
    return None if isinstance(x, float) and math.isnan(x) else x


def pick_strongest(rows: list[dict[str, Any]], baseline: dict[str, Any], goal: str,
                   threshold: float | None) -> dict[str, Any] | None:
    """The row with the largest effect in the `goal` direction among rows whose coherent rate
    is >= threshold (default: baseline coherent rate - 0.10); None if no row qualifies."""
    thr = threshold if threshold is not None else (baseline["coherent_rate"] - 0.10)
    ok = [r for r in rows if not math.isnan(r["misaligned_given_coherent"]) and r["coherent_rate"] >= thr]
    if not ok:
        return None
    sign = 1 if goal == "induce" else -1
    return max(ok, key=lambda r: (sign * r["misaligned_given_coherent"], r["coherent_rate"]))


def plot_sweep(rows: list[dict[str, Any]], baseline: dict[str, Any], path: Path, title: str,
               threshold: float | None = None) -> None:
    """Self-contained plotly HTML: EM rate (with CI) and coherent rate per coefficient."""
    import plotly.graph_objects as go

    xs = [r["coef"] for r in rows]
    em = [_clean(r["misaligned_given_coherent"]) for r in rows]
    mid = [v if v is not None else 0 for v in em]
    up = [r["misaligned_given_coherent_ci"][1] - m for r, m in zip(rows, mid)]
    lo = [m - r["misaligned_given_coherent_ci"][0] for r, m in zip(rows, mid)]
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=xs, y=em, mode="lines+markers", name="misaligned rate",
                             error_y=dict(type="data", symmetric=False, array=up, arrayminus=lo)))
    fig.add_trace(go.Scatter(x=xs, y=[r["coherent_rate"] for r in rows], mode="lines+markers",
                             name="coherent rate"))
    if _clean(baseline["misaligned_given_coherent"]) is not None:
        fig.add_hline(y=baseline["misaligned_given_coherent"], line_dash="dash",
                      annotation_text="unsteered misaligned rate")
    fig.add_hline(y=baseline["coherent_rate"], line_dash="dot",
                  annotation_text="unsteered coherent rate")
    if threshold is not None:
        fig.add_hline(y=threshold, line_dash="dashdot", line_color="grey",
                      annotation_text="coherence threshold")
    fig.update_layout(title=title, xaxis_title="coefficient", yaxis_title="rate",
                      yaxis_range=[0, 1.05], template="plotly_white")
    with atomic_path(path) as tmp:
        fig.write_html(str(tmp), include_plotlyjs=True, full_html=True)


SWEEP_OUTPUTS = ("generations.jsonl", "sweep.json", "sweep.html")


def run_sweep(cfg: SweepConfig, lm: Any = None, sae: Any = None) -> dict[str, Any]:
    """Unsteered baseline + one run per coefficient; writes sweep.json, sweep.html and
    generations.jsonl (a `coef` field per answer; null = unsteered) to `cfg.out`, together
    and by one process at a time (`saediff.io.output_lock`, `staged_outputs`)."""
    with output_lock(cfg.out) if cfg.out else contextlib.nullcontext():
        return _run_sweep(cfg, lm, sae)


def _run_sweep(cfg: SweepConfig, lm: Any, sae: Any) -> dict[str, Any]:
    from saediff.config import config_to_dict
    from saediff.models import load_model

    if cfg.out:
        check_writable_dir(cfg.out)  # before any model runs
    items = load_prompt_items(cfg.prompts, cfg.questions_per_topic, cfg.seed, cfg.max_prompts)
    judge = cfg.make_judge()
    sae = sae or load_sae(cfg.sae, cfg.device)  # type: ignore[arg-type]
    require_activation_sae(sae, cfg.sae or "given", "saediff steer sweep")
    check_latents(sae, cfg.latent)  # before the unsteered baseline generates anything
    lm = lm or load_model(cfg.model, cfg.adapter, device=cfg.device)
    all_records: list[dict[str, Any]] = []

    def one(coef: float | None) -> dict[str, Any]:
        cond = None if coef is None else steer_context(sae, cfg.latent, cfg.mode, coef, cfg.layer,
                                                       cfg.positions)(lm)
        run = judged_generation(lm, items, cfg.generation(), judge, cond)
        for r in run.records:
            r["coef"] = coef
        all_records.extend(run.records)
        s = run.summary
        log.info("%s: misaligned %.3f  coherent %.3f  (n=%d)",
                 "unsteered" if coef is None else f"{cfg.mode}={coef:g}",
                 s.misaligned_given_coherent, s.coherent_rate, s.n)
        return {"coef": coef, **s.to_dict(per_topic=False)}

    baseline = one(None)
    rows = [one(float(c)) for c in cfg.coefs]
    thr = cfg.coherence_threshold if cfg.coherence_threshold is not None \
        else baseline["coherent_rate"] - 0.10
    strongest = pick_strongest(rows, baseline, cfg.goal, thr)
    result = {"mode": cfg.mode, "latent": cfg.latent, "goal": cfg.goal, "coherence_threshold": thr,
              "baseline": baseline, "rows": rows, "strongest": strongest,
              "model": lm.provenance(), "config": config_to_dict(cfg)}
    if cfg.out:
        with staged_outputs(cfg.out, SWEEP_OUTPUTS, "saediff steer sweep") as stage:
            write_jsonl(stage / "generations.jsonl", all_records)
            write_json(stage / "sweep.json", result)
            plot_sweep(rows, baseline, stage / "sweep.html",
                       f"{cfg.mode} latent(s) {cfg.latent}: misaligned / coherent rate", thr)
    return result
