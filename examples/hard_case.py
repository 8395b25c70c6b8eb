"""Issue 14's hard case on the shipped toy organism: can <= 5 directions undo the all-layer
adapter's emergent misalignment, and induce it in the base?

The all-layer LoRA (r 8 on every linear layer of all 3 blocks) writes into every block, so no
single direction of one layer carries its EM (docs/methods.md). Here the candidate set is one
direction per block: the fine-tune's mean residual shift delta_L = mean(x_ft - x_base) after
block L, measured on the same tokens (a paired cache per block of single-turn chats through
the chat template, as the models see them when answering). Interventions:

  fine-tuned model: subtract c * delta_L (each block alone, then all blocks), or project out
                    delta_L / |delta_L| at all blocks;
  base model:       add c * delta_L at all blocks (the reverse: does it induce EM?).

EM = misaligned among coherent answers (organism judge) on the untrained topics, 7 topics x 5
questions x `--samples` answers, with Wilson 95% CIs. About 3 minutes on 2 CPU cores.

    python examples/hard_case.py --out hard_case
"""
from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from saediff.cache.writer import CacheConfig, build_cache
from saediff.diff.methods import paired_rows
from saediff.io import write_json, write_jsonl
from saediff.judged import GenerationConfig, judged_generation
from saediff.judges import make_judge
from saediff.models import load_model
from saediff.organism import corpus_records, organism_path
from saediff.prompts import load_prompt_items
from saediff.steer.hooks import steer

Edit = tuple[str, int, float]  # ("sub" | "add" | "ablate", block, coefficient)


@contextlib.contextmanager
def edits(lm: Any, shifts: list[torch.Tensor], spec: list[Edit], positions: str = "all"
          ) -> Iterator[None]:
    """All edits of `spec` at once (one steering context per block)."""
    with contextlib.ExitStack() as stack:
        for kind, layer, c in spec:
            d = shifts[layer]
            if kind == "ablate":
                stack.enter_context(steer(lm, ablate=d, layer=layer, positions=positions))
            else:
                stack.enter_context(steer(lm, add=c if kind == "add" else -c, direction=d,
                                          layer=layer, positions=positions))
        yield


def evaluate(lm: Any, items: list[dict[str, Any]], judge: Any, shifts: list[torch.Tensor],
             spec: list[Edit], samples: int, seed: int, positions: str = "all"
             ) -> dict[str, Any]:
    gen = GenerationConfig(samples=samples, max_new_tokens=48, temperature=1.0, seed=seed)
    cond = edits(lm, shifts, spec, positions) if spec else None
    return judged_generation(lm, items, gen, judge, cond).summary.to_dict(per_topic=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--adapter", default="adapter_all")
    ap.add_argument("--tokens", type=int, default=80_000, help="paired cache tokens per block")
    ap.add_argument("--samples", type=int, default=8, help="answers per question")
    ap.add_argument("--roles", nargs="+", default=None,
                    help="token roles the mean shift is measured on (default: all but special)")
    ap.add_argument("--coefs", nargs="+", type=float, default=[0.5, 1.0, 1.5, 2.0],
                    help="c of 'subtract c * delta_L at all blocks'")
    ap.add_argument("--positions", choices=["all", "generated"], default="all",
                    help="edit every token, or only the answer being generated")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    org = organism_path()
    base, adapter = str(org / "base"), str(org / a.adapter)
    corpus = out / "corpus.jsonl"
    if not corpus.exists():
        write_jsonl(corpus, corpus_records(3000, seed=a.seed, max_turns=1))
    base_lm = load_model(base)
    ft_lm = load_model(base, adapter=adapter)
    n_layers = len(base_lm.layers)
    shifts = []
    for layer in range(n_layers):
        cache = build_cache(CacheConfig(base=base, finetuned_adapter=adapter, layer=layer,
                                        dataset=str(corpus), prompt_field="prompt",
                                        response_field="response", max_tokens=a.tokens,
                                        dtype="float32", out=str(out / f"paired_l{layer}.h5")),
                            models={"base": base_lm, "finetuned": ft_lm})
        rows = paired_rows(cache, roles=a.roles)
        shifts.append((rows["x_ft"] - rows["x_base"]).mean(0))
    items = load_prompt_items("organism:untrained", 5, a.seed)
    judge = make_judge("organism")
    every = range(n_layers)
    grid: list[tuple[str, Any, list[Edit]]] = [("fine-tuned", ft_lm, [])]
    grid += [("fine-tuned", ft_lm, [("sub", layer, 1.0)]) for layer in every]
    grid += [("fine-tuned", ft_lm, [("sub", layer, c) for layer in every]) for c in a.coefs]
    grid += [("fine-tuned", ft_lm, [("ablate", layer, 1.0) for layer in every])]
    grid += [("base", base_lm, [])]
    grid += [("base", base_lm, [("add", layer, c) for layer in every]) for c in (1.0, 2.0)]
    results = []
    for model, lm, spec in grid:
        r = evaluate(lm, items, judge, shifts, spec, a.samples, a.seed, a.positions)
        what = " + ".join(f"{k} {c:g}·δ{layer}" if k != "ablate" else f"ablate δ̂{layer}"
                          for k, layer, c in spec) or "none"
        results.append({"model": model, "edit": what, "directions": len(spec), **r})
        em, ci = r["misaligned_given_coherent"], r["misaligned_given_coherent_ci"]
        print(f"{model:10s} {what:40s} EM {em:.3f} [{ci[0]:.2f}, {ci[1]:.2f}]  "
              f"coherent {r['coherent_rate']:.3f}  n {r['n']}", flush=True)
    summary = {"adapter": a.adapter, "roles": a.roles, "positions": a.positions,
               "shift_norms": [float(s.norm()) for s in shifts],
               "shift_cosines": [[float(torch.nn.functional.cosine_similarity(s, t, dim=0))
                                  for t in shifts] for s in shifts],
               "results": results, "seconds": round(time.time() - t0, 1)}
    write_json(out / "hard_case.json", summary)
    print(f"wrote {out / 'hard_case.json'} ({summary['seconds']} s)")


if __name__ == "__main__":
    main()
