"""Training at real size (issue 13, part 5): ratios measured side by side in one run.

Activations: the residual stream after block 15 of SmolLM2-135M-Instruct (d_model 576, the
real model `saediff.organism.real.real_base_path()` imports), captured here on real English
text (the repo's docs); `--synthetic` uses Gaussian rows scaled to the same mean norm instead.

  1. TopK, k 32, d_sae 16384 and 65536: saediff tok/s / SAELens `SAETrainer` (dense autograd)
     tok/s on the same batches, saediff / the encode-only ceiling (encoder matmul + top-k),
     / that ceiling into a kept output buffer (the encoder's own cost) and / the dense-Adam
     floor (the kept-output ceiling + one fused Adam update of W_enc and W_dec's size; all
     timed step by step in rotation with saediff's steps), plus a profiled breakdown of
     saediff's step (encode, topk, decode, backward, aux, stats, clip, optimizer, other)
  2. data-parallel: 2-rank / 1-rank training throughput (torchrun, gloo on CPU, nccl on CUDA),
     same global batch; on CPU the 1-rank run gets all cores as threads
  3. (CUDA only) pinned / pageable host->GPU batch copy bandwidth

CPU figures use small batches and few steps so the default run stays within a few minutes on
a 2-core machine; with CUDA present every part also runs on the GPU at batch 4096.

Usage: python benchmarks/bench_scale_train.py [--synthetic] [--steps N] [--json OUT]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
LAYER, K = 15, 32
WIDTHS = (16384, 65536)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def capture(n_rows: int, synthetic: bool) -> tuple[torch.Tensor, str]:
    """[n_rows, 576] float32 activations of SmolLM2-135M-Instruct after block 15."""
    from saediff.models import load_model, run_to_layer
    from saediff.organism.real import real_base_path

    if synthetic:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n_rows, 576, generator=g)
        return x * (REAL_NORM / x.norm(dim=-1).mean()), "gaussian (scaled to the real mean norm)"
    lm = load_model(real_base_path(), device="cpu")
    text = " ".join(p.read_text() for p in sorted((ROOT / "docs").glob("*.md")))
    ids = lm.tokenizer(text, return_tensors="pt")["input_ids"][0]
    ctx, skip = 128, 4            # drop the first positions: attention-sink norms
    rows, i = [], 0
    while sum(len(r) for r in rows) < n_rows and (i + 1) * ctx <= len(ids):
        chunk = ids[i * ctx: (i + 1) * ctx][None]
        h = run_to_layer(lm, chunk, torch.ones_like(chunk), LAYER)[0, skip:].float()
        rows.append(h)
        i += 1
    x = torch.cat(rows)
    if len(x) < n_rows:           # not enough text: repeat (the timing only needs the scale)
        x = x.repeat(n_rows // len(x) + 1, 1)
    return x[:n_rows].contiguous(), "SmolLM2-135M-Instruct layer 15 (docs text)"


def cached_capture(path: str | None, n_rows: int, synthetic: bool) -> tuple[torch.Tensor, str]:
    """`capture`, read from / saved to `path` (a capture takes minutes on a busy CPU)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from saediff.io import atomic_path

    if path and Path(path).is_file():
        with safe_open(path, framework="pt") as f:
            return f.get_tensor("x")[:n_rows].contiguous(), f.metadata()["what"]
    x, what = capture(n_rows, synthetic)
    if path:
        with atomic_path(path) as tmp:
            save_file({"x": x}, str(tmp), metadata={"what": what})
    return x, what


REAL_NORM = 60.0  # overwritten by the measured norm when the real capture runs


def batches_of(x: torch.Tensor, B: int, n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [x[torch.randint(len(x), (B,), generator=g)] for _ in range(n)]


# labelled ranges of FastSAETrainer's step: scale = decoder norms + W_enc * n (SAELens's
# rescale_acts_by_decoder_norm) + x - b_dec; encode = the encoder matmul; clip = the gradient
# norm (the clip factor itself is applied inside the fused Adam step: optimizer)
PHASES = ("scale", "encode", "topk", "decode", "backward", "aux", "stats", "clip", "optimizer")


def breakdown(trainer, batches: list[torch.Tensor], device: str) -> dict[str, float]:
    """ms per step of each labelled phase of FastSAETrainer's step (torch.profiler ranges
    `saediff.*` in train/sparse.py and train/trainer.py), plus the unlabelled rest."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    sync(device)
    t = time.perf_counter()
    with profile(activities=acts) as prof:
        for b in batches:
            trainer.step(b)
        sync(device)
    total = 1e3 * (time.perf_counter() - t) / len(batches)
    out: dict[str, float] = {}
    for ev in prof.key_averages():
        if ev.key.startswith("saediff.") and ev.key[8:] in PHASES:
            us = ev.device_time_total if device.startswith("cuda") else ev.cpu_time_total
            out[ev.key[8:]] = out.get(ev.key[8:], 0.0) + us / 1e3 / len(batches)
    out["other"] = max(0.0, total - sum(out.values()))
    out["step"] = total
    return out


def throughput(width: int, batches: list[torch.Tensor], device: str, dead_frac: float = 0.0,
               profile_steps: int = 2, dtype: str = "float32", skip_saelens: bool = False
               ) -> dict:
    """saediff, SAELens SAETrainer and the encode-only ceiling on the same batches, timed in
    turn; then a profiled breakdown of saediff's step. `dead_frac` marks that share of latents
    dead in both trainers (the aux loss then runs, as in real runs: 31-40% dead)."""
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    from saediff.train.loop import TrainConfig
    from saediff.train.trainer import FastSAETrainer

    B, d = batches[0].shape
    dev_batches = [b.to(device) for b in batches]
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16) \
        if dtype == "bf16-autocast" else contextlib.nullcontext()

    def mark_dead(trainer) -> None:
        if dead_frac > 0:
            trainer.n_forward_passes_since_fired[: int(dead_frac * width)] = 10 ** 9

    def run(trainer) -> float:
        mark_dead(trainer)
        with autocast:
            trainer.step(dev_batches[0])                       # warm-up
            sync(device)
            t = time.perf_counter()
            for b in dev_batches[1:]:
                trainer.step(b)
                mark_dead(trainer)
            sync(device)
        return B * (len(dev_batches) - 1) / (time.perf_counter() - t)

    def sae():
        torch.manual_seed(0)
        return TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d, d_sae=width, k=K, device=device))

    cfg = TrainConfig(d_sae=width, k=K, batch_size=B, total_tokens=B * 1000, lr=2e-4,
                      device=device)
    fast = FastSAETrainer(cfg, sae(), iter(dev_batches))
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t_fast, t_ceil, t_kept, t_floor = interleaved(fast, dev_batches, device, autocast, mark_dead)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.startswith("cuda") else None
    with autocast:
        phases = breakdown(fast, dev_batches[1: 1 + profile_steps], device)
    del fast
    t_sl = None
    if not skip_saelens:
        sl = SAETrainer(SAETrainerConfig(total_training_samples=B * 1000,
                                         train_batch_size_samples=B, lr=2e-4, lr_end=2e-5,
                                         device=device), sae(), iter(dev_batches))
        t_sl = run(sl)
        del sl
    return {"d_sae": width, "batch": B, "dead_frac": dead_frac, "dtype": dtype,
            "saediff_tok_s": t_fast, "saelens_tok_s": t_sl, "ceiling_tok_s": t_ceil,
            "ratio_vs_saelens": t_fast / t_sl if t_sl else None,
            "ratio_vs_ceiling": t_fast / t_ceil, "ceiling_ms": 1e3 * B / t_ceil,
            "kept_ceiling_tok_s": t_kept, "ratio_vs_kept_ceiling": t_fast / t_kept,
            "adam_floor_tok_s": t_floor, "ratio_vs_adam_floor": t_fast / t_floor,
            "floor_vs_kept_ceiling": t_floor / t_kept,
            "breakdown_ms": phases, "peak_gpu_gib": peak}


def interleaved(fast, batches: list[torch.Tensor], device: str, autocast, mark_dead
                ) -> tuple[float, ...]:
    """tok/s of saediff's step, of the encode-only ceiling (fresh output, as issue 22 defines
    it), of that ceiling writing into a kept output buffer (the encoder's own cost: the CPU
    step keeps its buffer) and of the dense-Adam floor, on the same weights, timed step by step
    in rotation (median per arm), so a shared machine's drifting load hits all four.

    The floor is the kept-buffer ceiling plus one fused Adam update of two [d_sae, d_in]
    tensors (W_enc and W_dec's size): exact Adam moves every weight every step, since moments
    decay even where a latent did not fire, so no step that matches SAELens's can cost less,
    whatever its batch. Its ratio to the kept-output ceiling is the most any such step can
    reach."""
    from saediff.train.sparse import encode_ceiling_step

    B = batches[0].shape[0]
    w, b = fast.sae.W_enc.detach(), fast.sae.b_enc.detach()
    opt, times = adam_floor(fast.sae.W_dec), ([], [], [], [])
    # autocast's bf16 output cannot go into a float32 buffer: there the kept arm is the plain one
    buf = None if isinstance(autocast, torch.autocast) else torch.empty(B, w.shape[1], device=w.device)

    def timed(fn) -> float:
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        return time.perf_counter() - t

    def floor(x: torch.Tensor) -> None:
        encode_ceiling_step(w, b, x, K, out=buf)
        opt.step()

    mark_dead(fast)
    with autocast:
        fast.step(batches[0])                                   # warm-up
        floor(batches[0])
        for i, x in enumerate(batches[1:]):
            arms = [(times[0], lambda x=x: fast.step(x)),
                    (times[1], lambda x=x: encode_ceiling_step(w, b, x, K)),
                    (times[2], lambda x=x: encode_ceiling_step(w, b, x, K, out=buf)),
                    (times[3], lambda x=x: floor(x))]
            for ts, fn in arms[i % 4:] + arms[: i % 4]:
                ts.append(timed(fn))
            mark_dead(fast)
    return tuple(B / statistics.median(ts) for ts in times)


def adam_floor(like: torch.Tensor) -> torch.optim.Optimizer:
    """Fused Adam (the trainer's) over two tensors shaped like W_dec, gradients set."""
    ps = [torch.nn.Parameter(torch.randn_like(like)) for _ in range(2)]
    for p in ps:
        p.grad = torch.randn_like(p)
    fused = like.device.type in ("cpu", "cuda")
    return torch.optim.Adam(ps, lr=2e-4, fused=fused)


def print_breakdown(r: dict, device: str) -> None:
    """ms per step and share of the profiled step of each phase, beside the ceiling's ms."""
    ph = r["breakdown_ms"]
    step = ph["step"]
    parts = "  ".join(f"{k} {ph[k]:.0f} ({ph[k] / step:.0%})" for k in (*PHASES, "other")
                      if k in ph)
    print(f"[{device}]   step breakdown, ms/step (profiled, {step:.0f} ms/step): {parts}",
          flush=True)
    enc = ph.get("encode", 0.0) + ph.get("topk", 0.0)
    print(f"[{device}]   encode-only ceiling {r['ceiling_ms']:.0f} ms/step (timed); profiled "
          f"encode + topk {enc:.0f} ms = {enc / step:.0%} of the step; the rest "
          f"{step - enc:.0f} ms (B-independent part: clip + optimizer "
          f"{sum(ph.get(k, 0.0) for k in ('clip', 'optimizer')):.0f} ms)",
          flush=True)


# --- data-parallel throughput (torchrun workers) ---------------------------------------------

def worker(data: str, width: int, device: str, out: str) -> None:
    """One torchrun rank: FastSAETrainer steps on its share of each global batch."""
    from safetensors.torch import load_file

    from saediff.dist import process_group, rank_device
    from saediff.train.ddp import DataParallel
    from saediff.train.loop import TrainConfig, build_sae
    from saediff.train.trainer import FastSAETrainer

    x = load_file(data)["x"]
    n_batches, B = int(os.environ["BENCH_BATCHES"]), int(os.environ["BENCH_B"])
    with process_group(device) as world:
        dev = rank_device(device)
        cfg = TrainConfig(d_sae=width, k=K, batch_size=B, total_tokens=B * 1000, device=dev)
        tr = FastSAETrainer(cfg, build_sae(cfg, x.shape[1], {}), None)
        dp = DataParallel(world, B, dev)
        tr.ddp = dp if world.active else None
        batches = batches_of(x, B, n_batches)
        tr.step(dp.local(batches[0]))
        sync(dev)
        t = time.perf_counter()
        for b in batches[1:]:
            tr.step(dp.local(b))
        sync(dev)
        tps = B * (n_batches - 1) / (time.perf_counter() - t)
        if world.is_main:
            Path(out).write_text(json.dumps({"tok_s": tps, "world": world.world_size}))


def data_parallel(x: torch.Tensor, width: int, B: int, n_batches: int, device: str,
                  work: Path) -> dict:
    from safetensors.torch import save_file

    data = work / "x.safetensors"
    save_file({"x": x.contiguous()}, data)
    res = {}
    cores = os.cpu_count() or 1
    for n in (1, 2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        out = work / f"dp{n}.json"
        # CPU: 1 rank uses every core as threads; N ranks split them (same hardware for both)
        threads = max(1, cores // n) if device == "cpu" else 1
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "BENCH_BATCHES": str(n_batches),
               "BENCH_B": str(B), "PYTHONPATH": str(ROOT)}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n),
               "--master-addr", "127.0.0.1", "--master-port", str(port), __file__, "--worker",
               str(data), str(width), device, str(out)]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(r.stderr[-2000:])
        res[n] = json.loads(out.read_text())["tok_s"]
    return {"d_sae": width, "batch": B, "one_rank_tok_s": res[1], "two_rank_tok_s": res[2],
            "ratio_2_vs_1": res[2] / res[1]}


def pinned_ratio(x: torch.Tensor, B: int) -> dict:
    b = x[:B].contiguous()
    pb = b.pin_memory()
    out = {}
    for name, src, nb in (("pageable", b, False), ("pinned", pb, True)):
        src.to("cuda", non_blocking=nb)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(50):
            src.to("cuda", non_blocking=nb)
        torch.cuda.synchronize()
        out[name] = 50 * b.numel() * 4 / (time.perf_counter() - t) / 1e9
    return {"pageable_GB_s": out["pageable"], "pinned_GB_s": out["pinned"],
            "ratio_pinned_vs_pageable": out["pinned"] / out["pageable"]}


def main(argv: list[str] | None = None) -> int:
    global REAL_NORM
    p = argparse.ArgumentParser()
    p.add_argument("--synthetic", action="store_true", help="Gaussian rows, no model capture")
    p.add_argument("--steps", type=int, default=3, help="timed CPU steps per trainer")
    p.add_argument("--cpu-batches", type=int, nargs="+", default=[1024],
                   help="CPU batch sizes (default 1024; the issue's grid is 1024 4096)")
    p.add_argument("--widths", type=int, nargs="+", default=list(WIDTHS))
    p.add_argument("--dead-frac", type=float, default=0.0,
                   help="share of latents marked dead in both trainers (aux loss on)")
    p.add_argument("--skip-dp", action="store_true", help="skip the 2-rank / 1-rank part")
    p.add_argument("--skip-saelens", action="store_true",
                   help="skip the (slow, dense) SAELens SAETrainer arm: ratios to the ceiling only")
    p.add_argument("--no-cpu", action="store_true", help="with CUDA: GPU figures only")
    p.add_argument("--profile-steps", type=int, default=2, help="profiled steps per breakdown")
    p.add_argument("--rows", type=int, default=None, help="activation rows (default 4096 CPU, "
                   "8192 with CUDA)")
    p.add_argument("--cpu-dtypes", nargs="+", default=["float32"],
                   choices=["float32", "bf16-autocast"])
    p.add_argument("--acts-file", help="reuse the captured activations in this safetensors "
                   "file (written here after a capture when it does not exist)")
    p.add_argument("--json", help="write results here")
    p.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        worker(a.worker[0], int(a.worker[1]), a.worker[2], a.worker[3])
        return 0
    logging.basicConfig(level=logging.WARNING)
    cuda = torch.cuda.is_available()
    t0 = time.perf_counter()
    x, what = cached_capture(a.acts_file, a.rows or (8192 if cuda else 4096), a.synthetic)
    REAL_NORM = float(x.norm(dim=-1).mean())
    res: dict = {"activations": what, "rows": len(x), "mean_norm": REAL_NORM,
                 "capture_s": time.perf_counter() - t0, "cpu_threads": torch.get_num_threads(),
                 "cpu": {}, "cuda": {}}
    print(f"activations: {what}, {len(x)} rows x {x.shape[1]}, mean norm {REAL_NORM:.1f} "
          f"({res['capture_s']:.0f} s)")
    plan = [("cpu", B, a.steps + 1) for B in a.cpu_batches if not (cuda and a.no_cpu)] + \
        ([("cuda", B, 11) for B in (1024, 4096)] if cuda else [])
    with tempfile.TemporaryDirectory() as tmp:
        for device, B, n in plan:
            batches = batches_of(x, B, n)
            res[device].setdefault("topk", [])
            dtypes = ("float32", "bf16-autocast") if device == "cuda" else a.cpu_dtypes
            for width in a.widths:
                for dt in dtypes:
                    r = throughput(width, batches, device, a.dead_frac, a.profile_steps, dt,
                                   a.skip_saelens)
                    res[device]["topk"].append(r)
                    vs_sl = "SAELens skipped" if r["saelens_tok_s"] is None else (
                        f"SAELens SAETrainer {r['saelens_tok_s']:.0f} tok/s = "
                        f"{r['ratio_vs_saelens']:.2f}x")
                    print(f"[{device}] TopK d_sae {width} k {K} batch {B} {dt} dead "
                          f"{a.dead_frac:.2f}: saediff {r['saediff_tok_s']:.0f} tok/s / {vs_sl}; "
                          f"/ encode-only ceiling {r['ceiling_tok_s']:.0f} tok/s = "
                          f"{r['ratio_vs_ceiling']:.2f}; / kept-output ceiling "
                          f"{r['kept_ceiling_tok_s']:.0f} tok/s = {r['ratio_vs_kept_ceiling']:.2f}"
                          f"; / + dense-Adam floor "
                          f"{r['adam_floor_tok_s']:.0f} tok/s = {r['ratio_vs_adam_floor']:.2f} "
                          f"(the floor itself is {r['floor_vs_kept_ceiling']:.2f} of the kept-output "
                          "ceiling)",
                          flush=True)
                    print_breakdown(r, device)
            first = B == min(bb for dd, bb, _ in plan if dd == device)
            if a.skip_dp or not first:
                pass
            elif device == "cuda" and torch.cuda.device_count() < 2:
                print("[cuda] 2-rank / 1-rank: skipped (one GPU)")
            else:
                r = data_parallel(x, WIDTHS[0], B, n + 1, device, Path(tmp))
                res[device]["data_parallel"] = r
                print(f"[{device}] data-parallel d_sae {WIDTHS[0]} global batch {B}: 2 ranks "
                      f"{r['two_rank_tok_s']:.0f} tok/s / 1 rank {r['one_rank_tok_s']:.0f} "
                      f"tok/s = {r['ratio_2_vs_1']:.2f}", flush=True)
            if device == "cuda" and first:
                r = pinned_ratio(x, B)
                res[device]["transfer"] = r
                print(f"[cuda] host->GPU batch copy: pinned {r['pinned_GB_s']:.1f} GB/s / "
                      f"pageable {r['pageable_GB_s']:.1f} GB/s = "
                      f"{r['ratio_pinned_vs_pageable']:.2f}")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
