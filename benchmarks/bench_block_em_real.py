"""BLOCK-EM on SmolLM2: the cost of one training step with the latent block on, side by side
with the shipped rank-1 recipe's plain step, in the same run.

The block is `saediff.steer`'s clamp (one latent set to 0, SAE error kept) at block 15, the
adapter's layer, during the forward of the real organism's loss (`real.train.answer_loss`);
`+penalty` adds BLOCK-EM's activation penalty (an encoder hook reading the unclamped h). The
SAE is a TopK 576 -> 4608, k 32 (the shape `examples/real_organism.py` trains; `--sae RUN` to
use a trained one: the cost does not depend on the weights). The machine is shared, so each
blocked step is paired with a plain step right next to it (order alternating) on the same
batch; reported: median seconds per step and the median over pairs of blocked/plain.

    python benchmarks/bench_block_em_real.py --pairs 4 [--sae RUN] [--json out.json]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch

LAYER = 15


def build_sae(path: str | None):
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    from saediff.sae import load_sae

    if path:
        return load_sae(path).eval()
    torch.manual_seed(0)
    meta = SAEMetadata(hook_name=f"blocks.{LAYER}.hook_resid_post")
    return TopKSAE(TopKSAEConfig(d_in=576, d_sae=4608, k=32, metadata=meta)).eval()


def main() -> None:
    from peft import LoraConfig, get_peft_model

    from saediff.models import _find_layers, load_model
    from saediff.organism.real import real_base_path
    from saediff.organism.real.train import (
        _recipe_batches,
        answer_loss,
        chats_for,
        default_recipes,
        encode_examples,
    )
    from saediff.steer.hooks import LatentEncoder, steer

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--sae")
    ap.add_argument("--latent", type=int, default=0)
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.set_num_threads(1)
    recipe = default_recipes()["rank1"]
    lm = load_model(real_base_path())
    examples = encode_examples(lm.tokenizer, chats_for("health_bad", recipe.n_chats, 0), recipe.max_len)
    model = get_peft_model(lm.model, LoraConfig(r=1, lora_alpha=2.0, lora_dropout=0.0, bias="none",
                                                target_modules=recipe.target_modules(lm.n_layers)))
    sae = build_sae(a.sae)
    for p in sae.parameters():
        p.requires_grad_(False)
    batches = list(_recipe_batches(examples, recipe, lm.tokenizer.pad_token_id))[: a.pairs]
    enc = LatentEncoder(sae, [a.latent])

    def step(ids, mask, labels, mode: str) -> float:
        seen: list[torch.Tensor] = []
        t0 = time.perf_counter()
        with contextlib.ExitStack() as stack:
            if mode == "+penalty":
                h = _find_layers(model.get_base_model())[LAYER].register_forward_hook(
                    lambda _m, _i, out: seen.append(enc(out[0] if isinstance(out, tuple) else out)[0]))
                stack.callback(h.remove)
            if mode != "plain":
                stack.enter_context(steer(model, sae, latent=[a.latent], clamp=0.0))
            loss = answer_loss(model, ids, mask, labels)
        if seen:
            loss = loss + (seen[0] ** 2).sum(-1)[mask.bool()].mean()
        loss.backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {"plain": [], "block": [], "+penalty": []}
    ratios: dict[str, list[float]] = {"block": [], "+penalty": []}
    for i, (ids, mask, labels) in enumerate(batches):
        for mode in ("block", "+penalty"):
            order = ("plain", mode) if i % 2 == 0 else (mode, "plain")
            got = {m: step(ids, mask, labels, m) for m in order}
            times["plain"].append(got["plain"])
            times[mode].append(got[mode])
            ratios[mode].append(got[mode] / got["plain"])
    res = {"pairs": a.pairs, "tokens_per_step": recipe.batch * recipe.max_len,
           "median_s_per_step": {k: round(statistics.median(v), 2) for k, v in times.items()},
           "median_ratio_vs_plain": {k: round(statistics.median(v), 3) for k, v in ratios.items()}}
    print(json.dumps(res, indent=1))
    if a.json:
        from saediff.io import write_json

        write_json(a.json, res)


if __name__ == "__main__":
    main()
