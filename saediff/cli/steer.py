"""`saediff steer ...`, `saediff steer sweep ...`, `saediff steer reroute ...`."""
from __future__ import annotations

import argparse
import json
import math

from saediff.config import add_dataclass_args, build_config


def _rate(s: dict) -> str:
    r, (lo, hi) = s["misaligned_rate"], s["misaligned_ci"]
    em = "n/a (no coherent answer)" if r is None or (isinstance(r, float) and math.isnan(r)) \
        else f"{r:.3f} [{lo:.3f}, {hi:.3f}]"
    return f"misaligned {em}  coherent {s['coherent_rate']:.3f}  n={s['n']}"


def main(argv: list[str]) -> int:
    if argv and argv[0] == "sweep":
        return _sweep(argv[1:])
    if argv and argv[0] == "reroute":
        return _reroute(argv[1:])
    if argv and argv[0] == "organism":
        return _organism(argv[1:])
    from saediff.steer.evaluate import SteerConfig, run_steer

    p = argparse.ArgumentParser(
        prog="saediff steer",
        description="Generate answers with an SAE latent clamped (--clamp C, keeping the SAE "
                    "error term) or its decoder direction added (--add A), judge them, and "
                    "write DIR/generations.jsonl and DIR/summary.json. Without --clamp/--add the "
                    "run is unsteered (a baseline). Sub-modes: `saediff steer sweep ...` "
                    "(coefficient sweep), `saediff steer reroute ...` (re-run the diff with the "
                    "latent clamped).")
    p.add_argument("--config", help="YAML file with SteerConfig fields (flags override it)")
    add_dataclass_args(p, SteerConfig, defaults_none=True)
    ns = vars(p.parse_args(argv))
    cfg = build_config(SteerConfig, ns.pop("config"), ns)
    summary = run_steer(cfg)
    print(_rate(summary))
    for topic, s in summary.get("per_topic", {}).items():
        print(f"  {topic:<14} {_rate(s)}")
    if cfg.out:
        print(f"written: {cfg.out}/generations.jsonl, {cfg.out}/summary.json")
    return 0


def _sweep(argv: list[str]) -> int:
    from saediff.steer.sweep import SweepConfig, run_sweep

    p = argparse.ArgumentParser(
        prog="saediff steer sweep",
        description="Sweep steering coefficients: misaligned and coherent rate per coefficient "
                    "(plus an unsteered baseline), a plot (sweep.html), and the strongest "
                    "setting that keeps coherence above the threshold (sweep.json).")
    p.add_argument("--config", help="YAML file with SweepConfig fields (flags override it)")
    add_dataclass_args(p, SweepConfig, defaults_none=True, skip=("clamp", "add"))
    ns = vars(p.parse_args(argv))
    cfg = build_config(SweepConfig, ns.pop("config"), ns)
    res = run_sweep(cfg)
    print(f"unsteered: {_rate(res['baseline'])}")
    for r in res["rows"]:
        print(f"{cfg.mode}={r['coef']:<8g} {_rate(r)}")
    best = res["strongest"]
    print(f"coherence threshold {res['coherence_threshold']:.3f}; strongest setting: "
          + (f"{cfg.mode}={best['coef']:g} ({_rate(best)})" if best else "none qualifies"))
    if cfg.out:
        print(f"written: {cfg.out}/sweep.json, {cfg.out}/sweep.html, {cfg.out}/generations.jsonl")
    return 0


def _reroute(argv: list[str]) -> int:
    from pathlib import Path

    from saediff.diff.data import DiffConfig
    from saediff.io import write_json
    from saediff.steer.sweep import format_reroute, reroute_check

    p = argparse.ArgumentParser(
        prog="saediff steer reroute",
        description="Rerouting check: re-run `saediff diff` with the given latent(s) clamped in "
                    "the fine-tuned model and report which latents now carry the shift. Takes "
                    "the diff's options (or its YAML via --config).")
    p.add_argument("--config", help="YAML file with DiffConfig fields (flags override it)")
    p.add_argument("--latent", type=int, nargs="+", required=True, help="latent(s) to clamp")
    p.add_argument("--clamp", type=float, default=0.0, help="clamp value (default: 0)")
    p.add_argument("--top", type=int, default=10, help="top latents compared (default: 10)")
    p.add_argument("--report", help="write the report JSON here (default: OUT/reroute.json)")
    add_dataclass_args(p, DiffConfig, defaults_none=True, skip=("top_k",))
    ns = vars(p.parse_args(argv))
    latents, clamp, top, report = ns.pop("latent"), ns.pop("clamp"), ns.pop("top"), ns.pop("report")
    cfg = build_config(DiffConfig, ns.pop("config"), {**ns, "top_k": top})
    rep = reroute_check(cfg, latents, clamp=clamp, top=top)
    print(format_reroute(rep))
    path = Path(report) if report else (Path(cfg.out) / "reroute.json" if cfg.out else None)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, rep)
        print(f"written: {path}")
    else:
        print(json.dumps({k: rep[k] for k in ("top_before", "top_after", "carriers")}))
    return 0


def _organism(argv: list[str]) -> int:
    from saediff.steer.sweep import organism_check

    p = argparse.ArgumentParser(
        prog="saediff steer organism",
        description="Causal check on the toy organism (topics never fine-tuned, exact judge): "
                    "the persona latent clamped to 0 in the fine-tuned model (target: EM rate "
                    "-80% or more, coherence loss <= 10 points) and clamped up in the base model "
                    "(target: EM induced).")
    p.add_argument("--sae", required=True, help="SAE run directory trained on the organism")
    p.add_argument("--latent", type=int, nargs="+", required=True, help="persona latent(s)")
    p.add_argument("--samples", type=int, default=10, help="answers per question (default: 10)")
    p.add_argument("--questions-per-topic", type=int, default=5, help="default: 5")
    p.add_argument("--up", type=float, nargs="+", help="clamp-up values for the base model "
                   "(default: 1,2,4,8 x the latent's typical activation on toxic answers)")
    p.add_argument("--path", help="organism directory (default: the shipped one)")
    p.add_argument("--out", help="output directory (sweeps + organism_check.json)")
    p.add_argument("--seed", type=int, default=0)
    ns = p.parse_args(argv)
    res = organism_check(ns.sae, ns.latent, ns.samples, ns.questions_per_topic, ns.up, ns.path,
                         ns.out, ns.seed)
    ft, base = res["finetuned"], res["base"]
    red = ft["em_reduction"]
    print(f"fine-tuned unsteered: {_rate(ft['unsteered'])}")
    print(f"fine-tuned clamp 0:   {_rate(ft['clamp0'])}")
    print(f"  EM reduction {'n/a' if red is None else f'{100 * red:.0f}%'}, coherence loss "
          f"{ft['coherence_loss_points']:.1f} points -> {'PASS' if ft['pass'] else 'FAIL'}")
    print(f"base unsteered:       {_rate(base['unsteered'])}")
    for r in base["rows"]:
        print(f"base clamp {r['coef']:<9g} {_rate(r)}")
    print(f"  misalignment induced: {'YES' if base['induced'] else 'NO'}")
    return 0 if ft["pass"] and base["induced"] else 1
