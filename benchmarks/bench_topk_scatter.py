"""The sparse TopK backward's scatter, alone, at real sizes: ratios measured side by side.

d W_dec = A^T g and d W_enc^T = dA^T x are [d_sae, d_in] sums of B*k weighted rows (B*k =
32,768 entries at batch 1,024, k 32). Candidates, timed in alternation on the same inputs:

  embedding_bag   one bag per latent into a fresh [d_sae, d_in] tensor (the step before)
  csr_addmm       CSR A^T @ g written over a kept buffer (addmm, beta 0: the step now)
  csr_mm_out      the same product via mm(out=) (allocates a zeroed temporary, then copies)
  index_add       gather B*k rows into a kept buffer, scale them, index_add_ into a zeroed one
  fresh_zeros     a fresh [d_sae, d_in] zeros (its page faults: the floor of any fresh output)

Every candidate's result is checked against embedding_bag's (allclose) before timing.

Usage: python benchmarks/bench_topk_scatter.py [--widths 16384 65536] [--batches 1024 4096]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F

warnings.filterwarnings("ignore", message=".*Sparse.*")
D_IN, K = 576, 32


def candidates(m: int, B: int) -> tuple[dict, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    dense = torch.randn(B, D_IN, generator=g)
    rows = torch.arange(B).repeat_interleave(K)
    cols = torch.randint(m, (B * K,), generator=g)
    w = torch.rand(B * K, generator=g)
    order = torch.from_numpy(np.argsort(cols.numpy(), kind="stable"))
    crow = torch.zeros(m + 1, dtype=torch.int64)
    torch.cumsum(torch.bincount(cols, minlength=m), 0, out=crow[1:])
    idx, ws, cs = rows[order], w[order], cols[order]
    buf, gath = torch.empty(m, D_IN), torch.empty(B * K, D_IN)

    def csr() -> torch.Tensor:
        return torch.sparse_csr_tensor(crow, idx, ws, (m, B))

    def index_add() -> torch.Tensor:
        buf.zero_()
        torch.index_select(dense, 0, idx, out=gath)
        gath.mul_(ws[:, None])
        return buf.index_add_(0, cs, gath)

    fns = {
        "embedding_bag": lambda: F.embedding_bag(idx, dense, crow[:-1], mode="sum",
                                                 per_sample_weights=ws),
        "csr_addmm": lambda: torch.addmm(buf, csr(), dense, beta=0.0, out=buf),
        "csr_mm_out": lambda: torch.mm(csr(), dense, out=buf),
        "index_add": index_add,
        "fresh_zeros": lambda: torch.zeros(m, D_IN),
    }
    return fns, fns["embedding_bag"]()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--widths", type=int, nargs="+", default=[16384, 65536])
    p.add_argument("--batches", type=int, nargs="+", default=[1024])
    p.add_argument("--reps", type=int, default=7)
    a = p.parse_args(argv)
    print(f"threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}")
    for m in a.widths:
        for B in a.batches:
            fns, ref = candidates(m, B)
            for name, fn in fns.items():
                if name != "fresh_zeros":
                    out = fn()
                    assert torch.allclose(out, ref, atol=1e-4), name
            times: dict[str, list[float]] = {n: [] for n in fns}
            items = list(fns.items())
            for r in range(a.reps):
                for name, fn in (items if r % 2 == 0 else items[::-1]):
                    t = time.perf_counter()
                    fn()
                    times[name].append(1e3 * (time.perf_counter() - t))
            base = statistics.median(times["embedding_bag"])
            row = "  ".join(f"{n} {statistics.median(v):.1f} ms ({base / statistics.median(v):.2f}x)"
                            for n, v in times.items())
            print(f"d_sae {m} batch {B} ({B * K} entries): {row}", flush=True)
    print(f"load average at end {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
