"""Cache throughput vs a bare forward pass, measured side by side in one run.

Prints tokens/s of `build_cache` (tokenise, forward to layer L, write float16 rows to HDF5)
divided by tokens/s of a bare HF forward over the same padded batches of the same model.
The cache stops the forward after block L, so at a middle layer it can beat 1.0; the
last-layer figure is the honest "overhead only" number. Also times transformer-lens's
TransformerBridge forward on the same model, which is why saediff uses plain HF hooks.

    python benchmarks/bench_cache.py [--layers 24] [--d-model 896] [--tokens 4096] [--model smollm2]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from saediff.cache.writer import CacheConfig, build_cache, iter_sequences, load_cache_models  # noqa: E402
from saediff.models import pad_batch  # noqa: E402

import tiny  # noqa: E402


def build_qwen_like(out: Path, d_model: int, n_layers: int, dtype: str = "float32") -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = tiny.build_tokenizer(out)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=d_model, intermediate_size=int(d_model * 5.43),
                      num_hidden_layers=n_layers, num_attention_heads=14 if d_model % 14 == 0 else 8,
                      num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True)
    torch.manual_seed(0)
    # saved in `dtype`: on a GPU `load_model` keeps the checkpoint's dtype (bf16 LM)
    Qwen2ForCausalLM(cfg).to(getattr(torch, dtype)).save_pretrained(out)
    return out


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--d-model", type=int, default=896)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-bridge", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="dtype of the random model's weights (GPU: the LM runs in it)")
    ap.add_argument("--json", help="also write the report here")
    ap.add_argument("--model", help="a HF model dir, or 'smollm2' for the real SmolLM2-135M-Instruct "
                                    "(the [real] extra); default: random Qwen-shaped weights")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    tmp = Path(tempfile.mkdtemp())
    if args.model:
        if args.model == "smollm2":
            from saediff.organism.real import real_base_path

            model_dir = real_base_path()
        else:
            model_dir = Path(args.model)
        args.layers = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
    else:
        model_dir = build_qwen_like(tmp / "model", args.d_model, args.layers, args.dtype)
    data = tmp / "docs.txt"
    words = tiny.WORDS
    g = torch.Generator().manual_seed(0)
    with data.open("w") as fh:
        for _ in range(args.tokens // 40 + 8):
            idx = torch.randint(0, len(words), (60,), generator=g).tolist()
            fh.write(" ".join(words[i] for i in idx) + "\n")
    results: dict[str, list[float]] = {}

    def cfg(layer: int, name: str) -> CacheConfig:
        return CacheConfig(base=str(model_dir), layer=layer, dataset=str(data), max_tokens=args.tokens,
                           ctx_len=128, batch_size=8, out=str(tmp / f"{name}.h5"), overwrite=True,
                           device=args.device)

    models = load_cache_models(cfg(0, "x"))
    lm = models["base"]
    seqs = []
    n = 0
    for _, ids, _ in iter_sequences(cfg(0, "x"), lm.tokenizer):
        ids = ids[: args.tokens - n]
        seqs.append(ids)
        n += len(ids)
        if n >= args.tokens:
            break
    batches = [tuple(t.to(args.device) for t in pad_batch(seqs[i:i + 8], lm.tokenizer.pad_token_id))
               for i in range(0, len(seqs), 8)]

    def bare() -> float:
        sync(args.device)
        t = time.perf_counter()
        with torch.no_grad():
            for ids, mask in batches:
                lm.model(input_ids=ids, attention_mask=mask, use_cache=False)
        sync(args.device)
        return n / (time.perf_counter() - t)

    def cached(layer: int) -> float:
        t = time.perf_counter()
        build_cache(cfg(layer, f"l{layer}"), models=models)
        return n / (time.perf_counter() - t)

    bridge = None
    if not args.no_bridge:
        try:
            from transformer_lens.model_bridge import TransformerBridge

            bridge = TransformerBridge.boot_transformers(str(model_dir), device=args.device,
                                                         dtype=lm.model.dtype)
        except Exception as exc:  # report, don't fail the benchmark
            print(f"TransformerBridge unavailable: {type(exc).__name__}: {exc}")

    def bridged() -> float:
        sync(args.device)
        t = time.perf_counter()
        with torch.no_grad():
            for ids, mask in batches:
                bridge(ids, attention_mask=mask)
        sync(args.device)
        return n / (time.perf_counter() - t)

    mid, last = args.layers // 2, args.layers - 1
    bare()  # warm-up
    for _ in range(args.repeats):  # interleaved so machine noise hits all arms alike
        results.setdefault("bare_forward", []).append(bare())
        results.setdefault(f"cache_layer{mid}", []).append(cached(mid))
        results.setdefault(f"cache_layer{last}", []).append(cached(last))
        if bridge is not None:
            results.setdefault("bridge_forward", []).append(bridged())
    med = {k: statistics.median(v) for k, v in results.items()}
    name = str(model_dir) if args.model else f"qwen2-like d_model={args.d_model} layers={args.layers}"
    report = {"model": name, "tokens": n, "device": args.device, "dtype": str(lm.model.dtype),
              "tokens_per_s": {k: round(v, 1) for k, v in med.items()},
              f"ratio_cache_layer{mid}_vs_bare": round(med[f"cache_layer{mid}"] / med["bare_forward"], 3),
              f"ratio_cache_layer{last}_vs_bare": round(med[f"cache_layer{last}"] / med["bare_forward"], 3)}
    if "bridge_forward" in med:
        report["ratio_bridge_vs_hf_forward"] = round(med["bridge_forward"] / med["bare_forward"], 3)
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
