"""`saediff steer ...`, `saediff steer sweep ...`, `saediff steer reroute ...`."""
from __future__ import annotations

import argparse
import json
import math

from saediff.config import add_dataclass_args, config_from_args


def _rate(s: dict) -> str:
    r, (lo, hi) = s["misaligned_given_coherent"], s["misaligned_given_coherent_ci"]
    em = "n/a (no coherent answer)" if r is None or (isinstance(r, float) and math.isnan(r)) \
        else f"{r:.3f} [{lo:.3f}, {hi:.3f}]"
    return f"misaligned {em}  coherent {s['coherent_rate']:.3f}  n={s['n']}"


def add_parser(sub: argparse._SubParsersAction) -> None:
    from saediff.diff.data import DiffConfig
    from saediff.steer.evaluate import SteerConfig
    from saediff.steer.sweep import SweepConfig

    p = sub.add_parser(
        "steer", help="clamp / add / ablate a latent during generation and judge it",
        description="Generate answers with an SAE latent clamped (--clamp C, keeping the SAE "
                    "error term) or its decoder direction added (--add A), judge them, and "
                    "write DIR/generations.jsonl and DIR/summary.json. Without --clamp/--add the "
                    "run is unsteered (a baseline). Sub-modes: `saediff steer sweep ...` "
                    "(coefficient sweep), `saediff steer reroute ...` (re-run the diff with the "
                    "latent clamped), `saediff steer organism ...` (causal check on the organism).")
    p.add_argument("--config", help="YAML file with SteerConfig fields (flags override it)")
    add_dataclass_args(p, SteerConfig, defaults_none=True)
    p.set_defaults(func=run)
    modes = p.add_subparsers(dest="steer_cmd", metavar="{sweep,reroute,organism}")

    s = modes.add_parser(
        "sweep", help="sweep steering coefficients",
        description="Sweep steering coefficients: misaligned and coherent rate per coefficient "
                    "(plus an unsteered baseline), a plot (sweep.html), and the strongest "
                    "setting that keeps coherence above the threshold (sweep.json).")
    s.add_argument("--config", help="YAML file with SweepConfig fields (flags override it)")
    add_dataclass_args(s, SweepConfig, defaults_none=True, skip=("clamp", "add"))
    s.set_defaults(func=_sweep)

    r = modes.add_parser(
        "reroute", help="re-run the diff with latent(s) clamped",
        description="Rerouting check: re-run `saediff diff` with the given latent(s) clamped in "
                    "the fine-tuned model and report which latents now carry the shift. Takes "
                    "the diff's options (or its YAML via --config).")
    r.add_argument("--config", help="YAML file with DiffConfig fields (flags override it)")
    r.add_argument("--latent", type=int, nargs="+", required=True, help="latent(s) to clamp")
    r.add_argument("--clamp", type=_finite, default=0.0, help="clamp value (default: 0)")
    r.add_argument("--top", type=int, default=10, help="top latents compared (default: 10)")
    r.add_argument("--report", help="write the report JSON here (default: OUT/reroute.json)")
    add_dataclass_args(r, DiffConfig, defaults_none=True, skip=("top_k",))
    r.set_defaults(func=_reroute)

    o = modes.add_parser(
        "organism", help="causal check of a persona latent on the toy organism",
        description="Causal check on the toy organism (topics never fine-tuned, exact judge): "
                    "the persona latent clamped to 0 in the fine-tuned model (target: EM rate "
                    "-80% or more, coherence loss <= 10 points) and clamped up in the base model "
                    "(target: EM induced).")
    o.add_argument("--sae", required=True, help="SAE run directory trained on the organism")
    o.add_argument("--latent", type=int, nargs="+", required=True, help="persona latent(s)")
    o.add_argument("--samples", type=int, default=10, help="answers per question (default: 10)")
    o.add_argument("--questions-per-topic", type=int, default=5, help="default: 5")
    o.add_argument("--up", type=_finite, nargs="+", help="clamp-up values for the base model "
                   "(default: 1,2,4,8 x the latent's typical activation on toxic answers)")
    o.add_argument("--path", help="organism directory (default: the shipped one)")
    o.add_argument("--out", help="output directory (sweeps + organism_check.json)")
    o.add_argument("--seed", type=int, default=0, help="sampling seed")
    o.set_defaults(func=_organism)


def _finite(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return v


def run(args: argparse.Namespace) -> int:
    from saediff.steer.evaluate import SteerConfig, run_steer

    cfg = config_from_args(SteerConfig, args)
    summary = run_steer(cfg)
    print(_rate(summary))
    for topic, s in summary.get("per_topic", {}).items():
        print(f"  {topic:<14} {_rate(s)}")
    if cfg.out:
        print(f"written: {cfg.out}/generations.jsonl, {cfg.out}/summary.json")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from saediff.steer.sweep import SweepConfig, run_sweep

    cfg = config_from_args(SweepConfig, args)
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


def _reroute(args: argparse.Namespace) -> int:
    from pathlib import Path

    from saediff.diff.data import DiffConfig
    from saediff.io import write_json
    from saediff.steer.hooks import check_unique_latents
    from saediff.steer.reroute import format_reroute, reroute_check

    latents, clamp, top, report = args.latent, args.clamp, args.top, args.report
    check_unique_latents(latents)
    cfg = config_from_args(DiffConfig, args, {"top_k": top})
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


def _organism(ns: argparse.Namespace) -> int:
    from saediff.organism.causal import organism_check

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
