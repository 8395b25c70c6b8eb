"""Steered vs unsteered throughput, prefill and decode apart, in the same run.

A randomly initialised Qwen2 (d_model 896 like Qwen2.5-0.5B, a few layers; nothing
downloaded) and a d_sae 16384 SAE. The machine is shared, so timings drift; each steered
forward is therefore paired with an identical unsteered forward right next to it (order
alternating): prefills of [batch, prompt_len] with a fresh KV cache, and single-token decode
steps on two KV caches fed the same tokens. Reported: median times, and the median over pairs
of the steered/unsteered tokens-per-second ratio, prefill and decode apart (target >= 0.95 for
a single-latent clamp). A TopK clamp needs the full encoder (top-k membership), so it is also
paired with its limit, a hook that computes the encoder and returns h unchanged
(`encoder_limit_topk`; target >= 0.97). Only the forward is timed: entering the context (slicing the SAE) is
a one-off cost per `with` block.

    python benchmarks/bench_steer.py                      # CPU, defaults
    python benchmarks/bench_steer.py --device cuda --layers 24 --json out.json
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch


def build(args):
    from sae_lens import StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=args.vocab, hidden_size=args.d_model, intermediate_size=args.d_mlp,
                      num_hidden_layers=args.layers, num_attention_heads=14, num_key_value_heads=2,
                      max_position_embeddings=4096, tie_word_embeddings=True)
    model = Qwen2ForCausalLM(cfg).to(args.device, getattr(torch, args.dtype)).eval()
    layer = args.layers // 2
    meta = SAEMetadata(hook_name=f"blocks.{layer}.hook_resid_post")
    saes = {"standard": StandardSAE(StandardSAEConfig(d_in=args.d_model, d_sae=args.d_sae, metadata=meta)),
            "topk": TopKSAE(TopKSAEConfig(d_in=args.d_model, d_sae=args.d_sae, k=64, metadata=meta))}
    for sae in saes.values():
        sae.to(args.device).eval()
    return model, saes


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(model, ctx, device: str, **kw) -> float:
    """One forward inside `ctx`; only the forward is timed (hook setup is not)."""
    with ctx:
        sync(device)
        t0 = time.perf_counter()
        model(**kw)
        sync(device)
        return time.perf_counter() - t0


@torch.no_grad()
def paired(model, make_ctx, ids, steps, repeats: int, device: str,
           make_base=contextlib.nullcontext) -> dict[str, list[float]]:
    """Interleaved pairs (base, steered) of identical forwards, order alternating:
    `repeats` prefills of `ids`, then per repeat one decode of len(steps) single-token
    forwards on a KV cache (same tokens on both sides). The base is unsteered unless
    `make_base` gives another context (the encoder limit)."""
    from transformers import DynamicCache

    out: dict[str, list[float]] = {"prefill": [], "decode": [], "prefill_base": [], "decode_base": []}
    for r in range(repeats):
        flip = r % 2 == 1
        times = {}
        for steered in ((True, False) if flip else (False, True)):
            ctx = make_ctx() if steered else make_base()
            times[steered] = timed(model, ctx, device, input_ids=ids, use_cache=True,
                                   past_key_values=DynamicCache(config=model.config))
        out["prefill"].append(times[True])
        out["prefill_base"].append(times[False])
        caches = {}
        for steered in (False, True):
            caches[steered] = DynamicCache(config=model.config)
            ctx = make_ctx() if steered else make_base()
            with ctx:
                model(input_ids=ids, use_cache=True, past_key_values=caches[steered])
        for i, tok in enumerate(steps):
            order = (True, False) if (i + r) % 2 else (False, True)
            for steered in order:
                ctx = make_ctx() if steered else make_base()
                t = timed(model, ctx, device, input_ids=tok, use_cache=True,
                          past_key_values=caches[steered])
                out["decode" if steered else "decode_base"].append(t)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=896)
    p.add_argument("--d-mlp", type=int, default=4864)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--d-sae", type=int, default=16384)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--conditions", nargs="+", default=None, help="subset of conditions to run")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0 = leave as is)")
    p.add_argument("--json", help="write results here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from saediff.steer.hooks import steer

    model, saes = build(args)
    layer = args.layers // 2
    j = 123
    conds = {
        "plain_hook": lambda: _plain_hook(model, layer),
        "clamp_1latent": lambda: steer(model, saes["standard"], latent=j, clamp=0.0),
        "clamp_1latent_generated": lambda: steer(model, saes["standard"], latent=j, clamp=0.0,
                                                 positions="generated"),
        "clamp_8latents": lambda: steer(model, saes["standard"], latent=list(range(8)), clamp=0.0),
        "add": lambda: steer(model, saes["standard"], latent=j, add=4.0),
        "ablate": lambda: steer(model, saes["standard"], latent=j, ablate=True),
        "clamp_topk": lambda: steer(model, saes["topk"], latent=j, clamp=0.0),
        "encoder_limit_topk": lambda: _encoder_hook(model, layer, saes["topk"]),
    }
    names = args.conditions or list(conds)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.prompt_len), generator=g).to(args.device)
    steps = [torch.randint(0, args.vocab, (args.batch, 1), generator=g).to(args.device)
             for _ in range(args.new_tokens)]
    with torch.no_grad():
        model(input_ids=ids)  # warm-up
    res = {"config": vars(args), "conditions": {}}
    print(f"{'condition':<26}{'prefill ms':>11}{'(unsteered)':>12}{'decode ms':>11}{'(unsteered)':>12}"
          f"{'prefill ratio':>15}{'decode ratio':>14}")
    for c in names:
        t = paired(model, conds[c], ids, steps, args.repeats, args.device)
        # tokens/s ratio steered/unsteered = time ratio unsteered/steered, median over pairs
        pr = statistics.median(b / s for b, s in zip(t["prefill_base"], t["prefill"]))
        dr = statistics.median(b / s for b, s in zip(t["decode_base"], t["decode"]))
        row = {"prefill_ms": 1e3 * statistics.median(t["prefill"]),
               "prefill_ms_unsteered": 1e3 * statistics.median(t["prefill_base"]),
               "decode_ms": 1e3 * statistics.median(t["decode"]),
               "decode_ms_unsteered": 1e3 * statistics.median(t["decode_base"]),
               "prefill_ratio": pr, "decode_ratio": dr,
               "pairs": {"prefill": len(t["prefill"]), "decode": len(t["decode"])}}
        res["conditions"][c] = row
        print(f"{c:<26}{row['prefill_ms']:>11.1f}{row['prefill_ms_unsteered']:>12.1f}"
              f"{row['decode_ms']:>11.2f}{row['decode_ms_unsteered']:>12.2f}{pr:>15.3f}{dr:>14.3f}",
              flush=True)
    if "clamp_topk" in names:
        res["clamp_topk_vs_limit"] = versus_limit(model, conds, ids, steps, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


def versus_limit(model, conds, ids, steps, args) -> dict[str, float]:
    """TopK clamp paired directly with the encoder limit (same hook, encoder computed, h
    returned unchanged): what steering costs beyond the encoder that top-k membership needs."""
    t = paired(model, conds["clamp_topk"], ids, steps, args.repeats, args.device,
               make_base=conds["encoder_limit_topk"])
    pr = statistics.median(b / s for b, s in zip(t["prefill_base"], t["prefill"]))
    dr = statistics.median(b / s for b, s in zip(t["decode_base"], t["decode"]))
    print(f"{'clamp_topk / limit':<26}{1e3 * statistics.median(t['prefill']):>11.1f}"
          f"{1e3 * statistics.median(t['prefill_base']):>12.1f}"
          f"{1e3 * statistics.median(t['decode']):>11.2f}"
          f"{1e3 * statistics.median(t['decode_base']):>12.2f}{pr:>15.3f}{dr:>14.3f}"
          "   (base = encoder limit; target >= 0.97)", flush=True)
    return {"prefill_ratio": pr, "decode_ratio": dr}


@contextlib.contextmanager
def _encoder_hook(model, layer, sae):
    """The limit for a TopK clamp: a hook that computes the SAE's full pre-activation and its
    top k (membership needs both) and returns the block output unchanged."""
    W = sae.W_enc.detach()
    const = sae.b_enc.detach() - sae.b_dec.detach() @ W
    k = int(sae.cfg.k)

    def hook(_m, _i, out):
        h = out[0] if isinstance(out, tuple) else out
        full = h.to(W.dtype) @ W + const
        full.topk(k, dim=-1)
        return out

    handle = model.model.layers[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def _plain_hook(model, layer):
    """The cheapest possible hook (returns the output unchanged): the floor for any steering."""
    handle = model.model.layers[layer].register_forward_hook(lambda m, i, o: o)
    try:
        yield
    finally:
        handle.remove()


if __name__ == "__main__":
    main()
