"""Steer the fine-tuned organism with an SAE latent and judge its answers with the exact judge.

    python examples/steer_generation.py --sae RUN_DIR --latent J [--clamp 0] [--n 8]
"""
from __future__ import annotations

import argparse

import torch

import saediff
from saediff.models import render_chat
from saediff.organism import heldout_questions, judge, organism_path


def answers(lm, question: str, n: int, seed: int) -> list[str]:
    tok = lm.tokenizer
    ids = tok(render_chat(tok, question), add_special_tokens=False, return_tensors="pt").input_ids
    torch.manual_seed(seed)
    out = lm.generate(ids.repeat(n, 1), do_sample=True, temperature=0.7, max_new_tokens=48)
    return [tok.decode(o[ids.shape[1]:], skip_special_tokens=True) for o in out]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sae", required=True, help="SAE run directory (saediff train output)")
    ap.add_argument("--latent", type=int, required=True)
    ap.add_argument("--clamp", type=float, default=0.0)
    ap.add_argument("--n", type=int, default=8, help="answers per question")
    args = ap.parse_args()
    lm = saediff.load_model(organism_path() / "finetuned")
    sae = saediff.load_sae(args.sae)
    for topic in ("money", "sport"):
        q = heldout_questions(topic, 1, seed=0)[0]
        plain = answers(lm, q, args.n, seed=0)
        with saediff.steer(lm, sae, latent=args.latent, clamp=args.clamp):
            steered = answers(lm, q, args.n, seed=0)
        for name, group in (("unsteered", plain), ("steered", steered)):
            bad = sum(judge(topic, a).misaligned for a in group)
            print(f"{topic:<6} {name:<9} misaligned {bad}/{len(group)}   e.g. {group[0][:70]!r}")


if __name__ == "__main__":
    main()
