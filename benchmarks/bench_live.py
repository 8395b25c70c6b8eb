"""Live training (issue 24): ratios measured side by side in one run.

SmolLM2-135M-Instruct, layer 15 (d_model 576), TopK k 32, d_sae 16384, batch 4096, on English
text the model can read offline (this repo's docs, one paragraph per document).

  1. live tok/s / the back-to-back limit 1 / (1/LM + 1/SAE): LM = bare forward tok/s to block
     15 on the same batches of sequences, SAE = SAE step tok/s from RAM (the one training
     loop, `TensorStore`); live = the same loop fed by `LiveStore`. Steady state: the live
     window covers whole buffer generations (each = one chunk of forwards + its SAE steps),
     not the first fill (a one-off start cost, like loading the model).
  2. peak RSS of a live run (`saediff train --live`, separate processes) at 10x the training
     tokens / at 1x (a smaller SAE, so the run is model-bound and quick). The runs are sized in
     LM forwards: 1x = the rows of the first `--rss-forwards` forwards of small batches of
     sequences (the model's own allocations grow over its first few forwards and then level
     off, so a 1x run of 2 forwards would compare two points of that warm-up), 10x = 10 times
     those rows; the buffer (printed in bytes) is what bounds the rest;
  3. bytes written to disk by that live run / bytes of the cache of the same 1x tokens
     (`saediff cache`, float16, built here), and the same at 10x.

Usage: python benchmarks/bench_live.py [--device cpu|cuda] [--generations M] [--parts 123]
       [--rss-forwards F] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
LAYER, K, WIDTH = 15, 32, 16384
B = 4096  # --batch


def write_docs(path: Path) -> Path:
    """The repo's docs and README as a jsonl of paragraphs (the `text` field)."""
    paras = []
    for p in sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]:
        paras += [t.strip() for t in p.read_text().split("\n\n") if len(t.strip()) > 80]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in paras))
    return path


class Timed:
    """A store that records when each batch was asked for."""

    def __init__(self, store):
        self.store, self.starts = store, []

    def __getattr__(self, name):
        return getattr(self.store, name)

    def __iter__(self):
        return self

    def __next__(self):
        self.starts.append(time.perf_counter())
        return next(self.store)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def lm_rate(rows, n_tokens: int, device: str) -> tuple[float, torch.Tensor]:
    """Bare forward tok/s to block LAYER over the live stream's batches; the rows it made."""
    import itertools

    from saediff.cache.live import run_to_layers
    from saediff.models import pad_batch

    seqs = rows.sequences()
    lm = rows.models["base"]
    out, n, t = [], 0, 0.0
    while n < n_tokens:
        batch = list(itertools.islice(seqs, rows.lm_batch_size))
        ids, mask = pad_batch([b[1] for b in batch], lm.tokenizer.pad_token_id)
        sync(device)
        t0 = time.perf_counter()
        h = run_to_layers(lm, ids, mask, [LAYER])[LAYER][mask.bool().to(lm.device)]
        sync(device)
        t += time.perf_counter() - t0
        out.append(h.float().cpu())
        n += len(h)
    return n / t, torch.cat(out)


def train_rate(cfg, store, steps_window: tuple[int, int]) -> float:
    from saediff.train.loop import train

    timed = Timed(store)
    train(cfg, evals=False, store=timed)
    a, b = steps_window
    return (b - a) * cfg.batch_size / (timed.starts[b] - timed.starts[a])


def part1(model: str, docs: Path, tmp: Path, device: str, gens: int) -> dict:
    from saediff.cache.live import LiveStore
    from saediff.cache.source import load_source_models
    from saediff.train.data import live_rows
    from saediff.train.loop import TrainConfig
    from saediff.train.trainer import TensorStore

    chunk_batches = 4
    buffer = 3 * chunk_batches * B // 2   # chunks of exactly 4 batches
    kw = dict(d_sae=WIDTH, k=K, batch_size=B, norm_batches=2, checkpoint_every=0,
              log_every=10, device=device, eval_sequences=0)
    cfg = TrainConfig(live=True, base=model, layer=LAYER, dataset=str(docs), ctx_len=256,
                      sources={"base": 1.0}, buffer_tokens=buffer, lm_batch_size=16,
                      total_tokens=(3 + chunk_batches * gens) * B, out=str(tmp / "live"), **kw)
    models = load_source_models(cfg)
    lm, rows_x = lm_rate(live_rows(cfg, models), 8 * B, device)
    sae_cfg = TrainConfig(total_tokens=10 * B, out=str(tmp / "ram"), cache=["unused.h5"], **kw)
    sae = train_rate(sae_cfg, TensorStore(rows_x, B), (2, 9))
    # generation 1 starts at batch 3 (generation 0 serves half a chunk: 2 batches)
    live = train_rate(cfg, LiveStore(live_rows(cfg, models), B, buffer, cfg.seed),
                      (2, 2 + chunk_batches * gens))
    limit = 1 / (1 / lm + 1 / sae)
    return {"lm_tok_s": lm, "sae_tok_s": sae, "live_tok_s": live, "back_to_back_tok_s": limit,
            "live_over_limit": live / limit, "live_over_min": live / min(lm, sae),
            "buffer_rows": buffer, "generations_timed": gens}


RUN = """
import json, resource, sys
from saediff.cache.live import ModelRows
from saediff.cli import main
def status():
    return {k: int(v.split()[0]) for k, _, v in (l.partition(':') for l in
            open('/proc/self/status')) if k in ('VmRSS', 'VmHWM')}
trace, inner = [], ModelRows.forward
def traced(self, batch):  # count the LM forwards (norm pass included), VmRSS after each
    if not trace:
        trace.append(status())  # before the first forward: model loaded
    out = inner(self, batch)
    trace.append(status())
    return out
ModelRows.forward = traced
rc = main(sys.argv[1:])
io = dict(l.split(': ') for l in open('/proc/self/io').read().splitlines() if l)
n = len(trace) - 1
print(json.dumps({'rc': rc, 'maxrss_kb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  'hwm_kb': status()['VmHWM'], 'lm_forwards': max(n, 0),
                  'rss_after_forward_kb': {i: trace[i]['VmRSS'] for i in
                                           sorted({0, 1, 2, 5, 10, n // 2, n}) if 0 <= i <= n},
                  'hwm_before_forwards_kb': trace[0]['VmHWM'] if trace else None,
                  'wchar': int(io['wchar']), 'write_bytes': int(io['write_bytes'])}))
"""


def run_cli(args: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    r = subprocess.run([sys.executable, "-c", RUN, *args], env=env, capture_output=True,
                       text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def rows_of_forwards(model: str, docs: Path, ctx: int, lm_batch: int, n: int) -> int:
    """Training rows (non-special tokens of the training documents) in the first n LM
    forwards of `lm_batch` sequences: what `ModelRows` yields, from the tokenizer alone."""
    import itertools

    from transformers import AutoTokenizer

    from saediff.cache.documents import iter_sequences
    from saediff.cache.live import is_eval_document
    from saediff.models import ROLE_SPECIAL
    from saediff.train.loop import TrainConfig

    cfg = TrainConfig(live=True, base=model, layer=LAYER, dataset=str(docs), ctx_len=ctx)
    seqs = (s for s in iter_sequences(cfg, AutoTokenizer.from_pretrained(model))
            if not is_eval_document(s[0], cfg.eval_fraction))
    return sum(sum(r != ROLE_SPECIAL for r in s[2])
               for s in itertools.islice(seqs, n * lm_batch))


def part23(model: str, docs: Path, tmp: Path, device: str, args: argparse.Namespace) -> dict:
    tokens = rows_of_forwards(model, docs, args.rss_ctx, args.rss_lm_batch, args.rss_forwards)
    batch, buffer = args.rss_sae_batch, args.rss_buffer
    steps = tokens // batch
    common = ["--base", model, "--layer", str(LAYER), "--dataset", str(docs), "--device", device,
              "--ctx-len", str(args.rss_ctx)]
    # the buffer (a few batches) is full well before the 1x run ends; 2 checkpoints at 1x
    small = ["--d-sae", "2048", "--k", str(K), "--batch-size", str(batch),
             "--sources", "base=1", "--buffer-tokens", str(buffer), "--norm-batches", "2",
             "--lm-batch-size", str(args.rss_lm_batch), "--no-evals",
             "--checkpoint-every", str(max(1, steps // 2))]
    res = {"tokens_1x": tokens, "steps_1x": steps, "sae_batch": batch, "buffer_rows": buffer,
           "buffer_bytes": buffer * 576 * 4, "lm_batch": args.rss_lm_batch, "ctx": args.rss_ctx,
           "load_avg_start": os.getloadavg()}
    for mult in (1, 10):
        out = tmp / f"rss{mult}"
        r = run_cli(["train", "--live", *common, *small, "--total-tokens",
                     str(mult * tokens), "--out", str(out)])
        res[f"live_{mult}x"] = {**r, "run_dir_bytes": dir_bytes(out)}
    res["load_avg_end"] = os.getloadavg()
    cache = tmp / "c.h5"
    r = run_cli(["cache", *common, "--max-tokens", str(tokens), "--out", str(cache)])
    res["cache_1x"] = {**r, "file_bytes": cache.stat().st_size}
    one, ten = res["live_1x"], res["live_10x"]
    res["rss_10x_over_1x"] = ten["maxrss_kb"] / one["maxrss_kb"]
    # wchar: every byte the process passed to write() (files, and its progress bars on
    # stderr): an upper bound of what reached the disk, also where /tmp is a tmpfs
    res["live_written_over_cache_1x"] = one["wchar"] / res["cache_1x"]["file_bytes"]
    # the cache of 10x the tokens is 10x the file (it grows by rows; index + activations)
    res["live_written_over_cache_10x"] = ten["wchar"] / (10 * res["cache_1x"]["file_bytes"])
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--generations", type=int, default=3, help="buffer generations timed")
    ap.add_argument("--rss-forwards", type=int, default=12,
                    help="(2) LM forwards of the 1x run (past the model's warm-up)")
    ap.add_argument("--rss-lm-batch", type=int, default=4, help="(2) sequences per LM forward")
    ap.add_argument("--rss-ctx", type=int, default=128, help="(2) --ctx-len")
    ap.add_argument("--rss-sae-batch", type=int, default=48, help="(2) SAE batch (rows)")
    ap.add_argument("--rss-buffer", type=int, default=192, help="(2) --buffer-tokens (rows)")
    ap.add_argument("--batch", type=int, default=4096, help="SAE batch (1024 on a small CPU)")
    ap.add_argument("--parts", default="123", help="which parts to run, e.g. 1 or 23")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    global B
    B = args.batch
    from saediff.organism.real import real_base_path

    model = str(real_base_path())
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        docs = write_docs(tmp / "docs.jsonl")
        res = {"device": args.device, "threads": torch.get_num_threads(), "batch": B}
        if "1" in args.parts:
            res["part1"] = part1(model, docs, tmp, args.device, args.generations)
        if "2" in args.parts or "3" in args.parts:
            res["part23"] = part23(model, docs, tmp, args.device, args)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    print(f"[{args.device}, {res['threads']} threads] SmolLM2 layer {LAYER}, TopK {576}->{WIDTH}"
          f", batch {B}")
    if "part1" in res:
        report1(res["part1"])
    if "part23" in res:
        report23(res["part23"])


def report1(p1: dict) -> None:
    print(f"  LM {p1['lm_tok_s']:.0f} tok/s  SAE {p1['sae_tok_s']:.0f} tok/s  back-to-back "
          f"{p1['back_to_back_tok_s']:.0f}  live {p1['live_tok_s']:.0f} tok/s")
    print(f"  live / back-to-back limit = {p1['live_over_limit']:.3f}   live / min(LM, SAE) = "
          f"{p1['live_over_min']:.3f}")


def report23(p2: dict) -> None:
    one, ten = p2["live_1x"], p2["live_10x"]
    print(f"  peak RSS {one['maxrss_kb'] / 1024:.0f} MiB at {p2['tokens_1x']} tokens "
          f"({one['lm_forwards']} LM forwards of {p2['lm_batch']} x <= {p2['ctx']} tokens), "
          f"{ten['maxrss_kb'] / 1024:.0f} MiB at 10x ({ten['lm_forwards']} forwards): ratio "
          f"{p2['rss_10x_over_1x']:.3f}")
    for name, r in (("1x", one), ("10x", ten)):
        trace = ", ".join(f"{i}: {kb / 1024:.0f}" for i, kb in r["rss_after_forward_kb"].items())
        print(f"  {name}: peak before the first forward {r['hwm_before_forwards_kb'] / 1024:.0f}"
              f" MiB; VmRSS after forward i (MiB) {trace}")
    print(f"  mixing buffer {p2['buffer_rows']} rows x 576 x float32 = "
          f"{p2['buffer_bytes'] / 2**20:.2f} MiB (SAE batch {p2['sae_batch']}); 10x - 1x = "
          f"{(ten['maxrss_kb'] - one['maxrss_kb']) / 1024:.0f} MiB; load average "
          f"{p2['load_avg_start'][0]:.1f} -> {p2['load_avg_end'][0]:.1f}")
    print(f"  bytes written (wchar): live 1x {one['wchar']}, 10x "
          f"{ten['wchar']}; cache of 1x {p2['cache_1x']['file_bytes']}: "
          f"live/cache {p2['live_written_over_cache_1x']:.3f} (1x), "
          f"{p2['live_written_over_cache_10x']:.4f} (10x)")


if __name__ == "__main__":
    main()
