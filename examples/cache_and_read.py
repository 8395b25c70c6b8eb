"""Cache the organism's base and fine-tuned activations, then read them back.

    python examples/cache_and_read.py [--out DIR] [--max-tokens N]
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import saediff
from saediff.cache import ActivationStore, CacheConfig, build_cache
from saediff.organism import corpus_records, metadata, organism_path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=tempfile.mkdtemp())
    ap.add_argument("--max-tokens", type=int, default=20_000)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = out / "chats.jsonl"
    with corpus.open("w") as fh:  # persona-labelled single-turn chats from the organism's grammar
        for rec in corpus_records(n=400, seed=1, max_turns=1):
            fh.write(json.dumps(rec) + "\n")
    org = organism_path()
    cfg = CacheConfig(base=str(org / "base"), finetuned=str(org / "finetuned"),
                      layer=metadata()["recommended_layer"],
                      dataset=str(corpus), prompt_field="prompt", response_field="response",
                      max_tokens=args.max_tokens, ctx_len=128, out=str(out / "organism.h5"))
    path = build_cache(cfg)

    cache = saediff.open_cache(path)
    print(f"rows={cache.rows} d_model={cache.d_model} layer={cache.layer} sources={cache.sources}")
    seq = cache.sequences(0, 1)[0]
    n = len(seq["ids"])
    shift = (cache.activations("finetuned", 0, n) - cache.activations("base", 0, n)).norm(dim=1)
    print(f"first sequence: {n} tokens, mean |finetuned - base| = {shift.mean():.3f}")

    store = ActivationStore(path, sources={"base": 0.5, "finetuned": 0.5}, roles=["response"],
                            batch_size=256, seed=0)
    batch = next(store)
    print(f"batch shape={tuple(batch.shape)} dtype={batch.dtype}")


if __name__ == "__main__":
    main()
