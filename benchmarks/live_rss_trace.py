"""VmRSS after every LM forward of a long live run: a warm-up that levels off, or a leak?

Three loops over SmolLM2-135M-Instruct layer 15 on this repo's docs (the documents of
`bench_live.py`), each sampling /proc/self/status after every model forward:

  bare   `run_to_layers` on the live stream's batches of sequences, nothing kept;
  store  `LiveStore` over `ModelRows` (the mixing buffer), batches drawn and dropped;
  train  `saediff.train.loop.train` fed by that `LiveStore` (SAE steps, metrics rows,
         checkpoints): the whole `train --live` loop, in-process.

Also counted every `--census` forwards: live torch tensors and all gc-tracked objects (a
leak in Python code, e.g. a list of tensors, grows these; allocator caches do not).

Usage: python benchmarks/live_rss_trace.py MODE [--forwards N] [--lm-batch 4] [--ctx 128]
       [--json OUT]   (env such as MALLOC_ARENA_MAX is inherited: set it per run)
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_live import LAYER, write_docs  # noqa: E402


def status() -> dict[str, int]:
    """VmRSS, VmHWM (kB) of this process."""
    out = {}
    for line in open("/proc/self/status"):
        key, _, val = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(val.split()[0])
    return out


def census() -> dict[str, int]:
    gc.collect()
    objs = gc.get_objects()
    warnings.simplefilter("ignore", FutureWarning)  # isinstance on torch's deprecated aliases
    return {"gc_objects": len(objs), "tensors": sum(isinstance(o, torch.Tensor) for o in objs)}


class Done(Exception):
    """Raised from inside the run once it has made the requested forwards."""


class Trace:
    """Wraps `ModelRows.forward` (or a bare forward) and records RSS after each call."""

    def __init__(self, census_every: int):
        self.rows: list[dict] = []
        self.census_every = census_every
        self.t0 = time.perf_counter()

    def record(self) -> None:
        n = len(self.rows) + 1
        row = {"forward": n, "s": round(time.perf_counter() - self.t0, 2), **status()}
        if self.census_every and (n == 1 or n % self.census_every == 0):
            row.update(census())
        self.rows.append(row)
        if n % 25 == 0:
            print(f"forward {n} {row['s']:.0f} s RSS {row['VmRSS'] // 1024} MiB", flush=True)


def make_cfg(model: str, docs: Path, out: Path, args) -> object:
    from saediff.train.loop import TrainConfig

    return TrainConfig(live=True, base=model, layer=LAYER, dataset=str(docs),
                       ctx_len=args.ctx, sources={"base": 1.0}, buffer_tokens=args.buffer,
                       lm_batch_size=args.lm_batch, d_sae=2048, k=32, batch_size=args.batch,
                       norm_batches=2, checkpoint_every=args.checkpoint_every, log_every=10,
                       device="cpu", eval_sequences=0, total_tokens=10**9, out=str(out))


def run_bare(rows, trace: Trace, n: int, pad_to: int = 0) -> None:
    import itertools

    from saediff.models import pad_batch, run_to_layers

    lm = rows.models["base"]
    seqs = itertools.cycle(list(rows.sequences()))  # the same batches, epoch after epoch
    for _ in range(n):
        batch = list(itertools.islice(seqs, rows.lm_batch_size))
        ids, mask = pad_batch([b[1] for b in batch], lm.tokenizer.pad_token_id)
        if pad_to:  # one input shape for every forward
            more = pad_to - ids.shape[1]
            ids = torch.nn.functional.pad(ids, (0, more), value=lm.tokenizer.pad_token_id)
            mask = torch.nn.functional.pad(mask, (0, more))
        run_to_layers(lm, ids, mask, [LAYER])
        trace.record()


def hook_forwards(rows, trace: Trace, n: int) -> None:
    """Record after every `rows.forward`; stop the run after n of them."""
    inner = rows.forward

    def forward(batch):
        out = inner(batch)
        trace.record()
        if len(trace.rows) >= n:
            raise Done
        return out

    rows.forward = forward


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=("bare", "store", "train"))
    ap.add_argument("--forwards", type=int, default=300)
    ap.add_argument("--lm-batch", type=int, default=4, help="sequences per forward")
    ap.add_argument("--ctx", type=int, default=128, help="--ctx-len (tokens per sequence)")
    ap.add_argument("--batch", type=int, default=48, help="SAE batch (rows)")
    ap.add_argument("--buffer", type=int, default=192, help="--buffer-tokens (rows)")
    ap.add_argument("--checkpoint-every", type=int, default=8)
    ap.add_argument("--pad-to", type=int, default=0, help="bare: pad every batch to this many tokens")
    ap.add_argument("--census", type=int, default=50, help="object census every N forwards")
    ap.add_argument("--json", help="write the trace here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from saediff.cache.live import LiveStore
    from saediff.cache.source import load_source_models
    from saediff.organism.real import real_base_path
    from saediff.train.data import live_rows

    trace = Trace(args.census)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        cfg = make_cfg(str(real_base_path()), write_docs(tmp / "docs.jsonl"), tmp / "run", args)
        rows = live_rows(cfg, load_source_models(cfg))
        base = {"loaded": status(), **census()}
        if args.mode == "bare":
            run_bare(rows, trace, args.forwards, args.pad_to)
        else:
            hook_forwards(rows, trace, args.forwards)
            store = LiveStore(rows, args.batch, args.buffer, cfg.seed)
            try:
                if args.mode == "store":
                    for _ in iter(store):
                        pass
                else:
                    from saediff.train.loop import train

                    train(cfg, evals=False, store=store)
            except Done:
                pass
    res = {"mode": args.mode, "args": vars(args), "start": base, "trace": trace.rows}
    if args.json:
        Path(args.json).write_text(json.dumps(res))
    summarise(res)


def summarise(res: dict) -> None:
    t = res["trace"]
    print(f"{res['mode']}: loaded {res['start']['loaded']['VmRSS'] // 1024} MiB, "
          f"{res['start']['tensors']} tensors, {res['start']['gc_objects']} objects")
    for i in sorted({1, 2, 5, 10, 20, 50, 100, 150, 200, 300, 400, 500, len(t)}):
        if i <= len(t):
            r = t[i - 1]
            extra = f"  tensors {r['tensors']} objects {r['gc_objects']}" if "tensors" in r else ""
            print(f"  forward {i:4d} ({r['s']:6.0f} s): RSS {r['VmRSS'] / 1024:7.1f} MiB  HWM "
                  f"{r['VmHWM'] / 1024:7.1f} MiB{extra}")


if __name__ == "__main__":
    main()
