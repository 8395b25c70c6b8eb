"""Benchmarks for `saediff train` (all in one run, ratios printed).

  0. calibration: fp32 matmul GFLOP/s of this machine
  1. training steps/s reading from the HDF5 cache / from an in-RAM tensor      (target >= 0.95)
  2. wall time: saediff 4-SAE sweep (cache once, train 4) / four SAELens
     LanguageModelSAETrainingRunner runs, same model, layer, tokens           (target <= 0.40)
  3. FVU saediff SAE / FVU SAELens-runner SAE, same architecture, k, tokens    (target <= 1.0)
  4. TopK tokens/s: saediff / SAELens SAETrainer on the same cached batches,
     d_in 896, d_sae 16384, k 32, fp32                                         (target >= 3)
     and saediff / encode-only ceiling (encoder matmul + top-k)               (target >= 0.7)

Usage: python benchmarks/bench_train.py [--quick] [--parts 0,1,2,3,4] [--json OUT]
The model for 1-3 is a randomly initialised Qwen2-style LM like the toy organism (d_model 96,
3 layers, layer 1), text = random words; sizes are in the constants below.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "train")]

D_TOY, LAYER = 96, 1
SWEEP = {"k": [8, 16], "d_sae": [768, 1536]}


def best_of(fn, n=3):
    fn()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return min(ts)


def calibrate() -> float:
    a, b = torch.randn(4096, 896), torch.randn(896, 16384)
    t = best_of(lambda: a @ b)
    return 2 * 4096 * 896 * 16384 / t / 1e9


def make_model_and_data(work: Path, n_docs: int):
    import tiny

    model = tiny.build_model(work / "lm", "qwen2", d_model=D_TOY, n_layers=3, seed=0)
    rng = np.random.default_rng(0)
    with (work / "text.jsonl").open("w") as fh:
        for _ in range(n_docs):
            fh.write(json.dumps({"text": " ".join(rng.choice(tiny.WORDS, 200))}) + "\n")
    return model, work / "text.jsonl"


def saediff_sweep(model: Path, text: Path, work: Path, tokens: int, batch: int):
    from saediff.cache.writer import CacheConfig, build_cache
    from saediff.train.loop import TrainConfig, train

    t0 = time.perf_counter()
    cache = build_cache(CacheConfig(base=str(model), layer=LAYER, dataset=str(text),
                                    out=str(work / "bench.h5"), max_tokens=int(tokens * 1.1),
                                    ctx_len=128, batch_size=32, dtype="float32", overwrite=True))
    t1 = time.perf_counter()
    cfg = TrainConfig(cache=[str(cache)], out=str(work / "sweep"), sources={"base": 1.0},
                      total_tokens=tokens, batch_size=batch, sweep=SWEEP, checkpoint_every=0,
                      eval_fraction=0.05, eval_sequences=0, dead_feature_window=1000)
    runs = train(cfg, evals=False)
    t2 = time.perf_counter()
    return cache, runs, t1 - t0, t2 - t1


def saelens_runs(model: Path, text: Path, work: Path, tokens: int, batch: int):
    import datasets
    from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner
    from sae_lens.config import LoggingConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAEConfig

    from saediff.models import load_tokenizer

    tok = load_tokenizer(str(model))
    rows = [json.loads(ln)["text"] for ln in text.read_text().splitlines()]
    ids = [tok(t)["input_ids"][:128] for t in rows]
    ds = datasets.Dataset.from_dict({"input_ids": [i for i in ids if len(i) == 128]})
    out, total = [], 0.0
    for k in SWEEP["k"]:
        for d_sae in SWEEP["d_sae"]:
            cfg = LanguageModelSAERunnerConfig(
                sae=TopKTrainingSAEConfig(d_in=D_TOY, d_sae=d_sae, k=k,
                                          normalize_activations="expected_average_only_in"),
                model_name=str(model), model_class_name="AutoModelForCausalLM",
                hook_name=f"model.layers.{LAYER}", dataset_path="", is_dataset_tokenized=True,
                streaming=False, context_size=128, training_tokens=tokens,
                train_batch_size_tokens=batch, n_batches_in_buffer=64,
                store_batch_size_prompts=32, prepend_bos=False, lr=4e-4, device="cpu",
                logger=LoggingConfig(log_to_wandb=False), checkpoint_path=None,
                output_path=str(work / f"saelens_k{k}_d{d_sae}"), n_batches_for_norm_estimate=20,
                dead_feature_window=1000, verbose=False)
            t = time.perf_counter()
            sae = LanguageModelSAETrainingRunner(cfg, override_dataset=ds).run()
            total += time.perf_counter() - t
            out.append(((k, d_sae), sae))
    return out, total


@torch.no_grad()
def fvu_on(sae, x: torch.Tensor) -> float:
    x_hat = sae.decode(sae.encode(x))
    return float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def part1(cache: Path, work: Path, steps: int, batch: int) -> dict:
    from saediff.cache.format import open_cache
    from saediff.cache.store import split_rows
    from saediff.train.loop import TrainConfig, train
    from saediff.train.trainer import TensorStore

    with open_cache(cache) as c:
        (lo, hi), _ = split_rows(c, 0.05)
        keep = torch.from_numpy(c.roles(lo, hi) != 0)
        data = c.activations("base", lo, hi)[keep]
    cfg = TrainConfig(cache=[str(cache)], out=str(work / "p1"), sources={"base": 1.0}, d_sae=1024,
                      k=12, total_tokens=steps * batch, batch_size=batch, checkpoint_every=0,
                      log_every=10, eval_fraction=0.05)
    times: dict[str, list[float]] = {"cache": [], "ram": []}
    for _ in range(2):
        for mode in ("cache", "ram"):
            shutil.rmtree(work / "p1", ignore_errors=True)
            t = time.perf_counter()
            store = TensorStore(data, batch) if mode == "ram" else None
            train(cfg, evals=False, store=store)
            times[mode].append(time.perf_counter() - t)
    c, r = min(times["cache"]), min(times["ram"])
    return {"steps": steps, "cache_steps_per_s": steps / c, "ram_steps_per_s": steps / r,
            "ratio": r / c}


def part4(work: Path, steps: int, gflops: float) -> dict:
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    from saediff.cache.store import ActivationStore
    from saediff.train.loop import TrainConfig
    from saediff.train.sparse import encode_ceiling_step
    from saediff.train.trainer import FastSAETrainer

    from test_train import write_array_cache

    d, m, k, B = 896, 16384, 32, 4096
    g = torch.Generator().manual_seed(0)
    basis = torch.randn(4 * d, d, generator=g) / d ** 0.5
    codes = torch.rand(B * (steps + 2), 4 * d, generator=g).pow(8)
    x = (codes @ basis).numpy().astype(np.float16)
    cache = write_array_cache(work / "p4.h5", {"base": x}, seq_len=128, layer=12)
    store = ActivationStore([cache], sources={"base": 1.0}, batch_size=B, seed=0,
                            buffer_rows=B * 4)
    batches = [next(store) for _ in range(steps + 1)]

    def run(trainer):
        trainer.step(batches[0])                       # warm-up
        t = time.perf_counter()
        for b in batches[1:]:
            trainer.step(b)
        return B * steps / (time.perf_counter() - t)

    torch.manual_seed(0)
    sl = SAETrainer(SAETrainerConfig(total_training_samples=B * 100, train_batch_size_samples=B,
                                     lr=2e-4, lr_end=2e-5),
                    TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d, d_sae=m, k=k)), iter(batches))
    cfg = TrainConfig(d_sae=m, k=k, batch_size=B, total_tokens=B * 100, lr=2e-4)
    torch.manual_seed(0)
    fast = FastSAETrainer(cfg, TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d, d_sae=m, k=k)),
                          iter(batches))
    tps_fast1 = run(fast)
    tps_sl = run(sl)
    tps_fast2 = run(fast)
    tps_fast = max(tps_fast1, tps_fast2)
    w, b = fast.sae.W_enc.detach(), fast.sae.b_enc.detach()
    t_ceiling = best_of(lambda: [encode_ceiling_step(w, b, bb, k) for bb in batches[1:]], n=2)
    tps_ceiling = B * steps / t_ceiling
    step_flops = 2 * B * d * m                        # the encoder matmul (the floor)
    return {"saelens_tok_s": tps_sl, "saediff_tok_s": tps_fast, "ceiling_tok_s": tps_ceiling,
            "ratio_vs_saelens": tps_fast / tps_sl, "ratio_vs_ceiling": tps_fast / tps_ceiling,
            "saediff_step_gflops": step_flops * tps_fast / B / 1e9,
            "saediff_frac_of_matmul_peak": step_flops * tps_fast / B / 1e9 / gflops}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="smaller token counts")
    p.add_argument("--parts", default="0,1,2,3,4")
    p.add_argument("--json", help="write results here")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    parts = {int(x) for x in a.parts.split(",")}
    tokens = 100_000 if a.quick else 400_000
    batch = 4096
    res: dict = {"threads": torch.get_num_threads()}
    work = Path(tempfile.mkdtemp(prefix="bench_train_"))
    try:
        gflops = calibrate()
        res["matmul_gflops"] = gflops
        print(f"[0] fp32 matmul (4096x896 @ 896x16384): {gflops:.1f} GFLOP/s "
              f"on {torch.get_num_threads()} threads", flush=True)
        if parts & {1, 2, 3}:
            model, text = make_model_and_data(work, n_docs=int(tokens * 1.3 / 200) + 50)
            cache, runs, t_cache, t_train = saediff_sweep(model, text, work, tokens, batch)
            res["saediff_sweep"] = {"cache_s": t_cache, "train_s": t_train}
        if 1 in parts:
            r = part1(cache, work, steps=40 if a.quick else 100, batch=batch)
            res["part1"] = r
            print(f"[1] steps/s from HDF5 cache {r['cache_steps_per_s']:.2f} / in-RAM "
                  f"{r['ram_steps_per_s']:.2f} = {r['ratio']:.3f}  (target >= 0.95)", flush=True)
        if parts & {2, 3}:
            sl, t_sl = saelens_runs(model, text, work, tokens, batch)
            t_sd = t_cache + t_train
            res["part2"] = {"saediff_s": t_sd, "saelens_s": t_sl, "ratio": t_sd / t_sl}
            print(f"[2] 4-SAE sweep wall time: saediff {t_sd:.1f}s (cache {t_cache:.1f}s + "
                  f"train {t_train:.1f}s) / SAELens 4 runner runs {t_sl:.1f}s = "
                  f"{t_sd / t_sl:.3f}  (target <= 0.40)", flush=True)
            from saediff.cache.format import open_cache
            from saediff.cache.store import split_rows
            from saediff.sae import load_sae

            with open_cache(cache) as c:
                _, (lo, hi) = split_rows(c, 0.05)
                keep = torch.from_numpy(c.roles(lo, hi) != 0)
                x = c.activations("base", lo, hi)[keep]
            rows = []
            for (key, sae_sl), run in zip(sl, runs):
                f_sd, f_sl = fvu_on(load_sae(run), x), fvu_on(sae_sl, x)
                rows.append({"k": key[0], "d_sae": key[1], "fvu_saediff": f_sd,
                             "fvu_saelens": f_sl, "ratio": f_sd / f_sl})
                print(f"[3] k {key[0]:>2} d_sae {key[1]:>4}: FVU saediff {f_sd:.4f} / SAELens "
                      f"runner {f_sl:.4f} = {f_sd / f_sl:.3f}  (target <= 1.0)", flush=True)
            res["part3"] = rows
        if 4 in parts:
            r = part4(work, steps=2 if a.quick else 4, gflops=gflops)
            res["part4"] = r
            print(f"[4] TopK d_in 896 d_sae 16384 k 32 fp32: saediff {r['saediff_tok_s']:.0f} "
                  f"tok/s / SAELens SAETrainer {r['saelens_tok_s']:.0f} tok/s = "
                  f"{r['ratio_vs_saelens']:.2f}x  (target >= 3)")
            print(f"    / encode-only ceiling {r['ceiling_tok_s']:.0f} tok/s = "
                  f"{r['ratio_vs_ceiling']:.3f}  (target >= 0.7); the step runs at "
                  f"{r['saediff_step_gflops']:.1f} encoder-GFLOP/s = "
                  f"{r['saediff_frac_of_matmul_peak']:.0%} of the measured matmul peak", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
