"""Differ peak RSS at 1x and 10x prompts, side by side in one run.

A 32,768-latent TopK SAE (k 32, random weights) on the shipped organism's block-1 residual,
`run_diff` with no responses (prompt tokens only), each size in a fresh subprocess so that
`ru_maxrss` is that run's own peak. Reported: peak RSS per size and the 10x/1x ratio (a
bounded differ keeps it near 1; a dense one grows with the tokens).

    python benchmarks/bench_diff_memory.py                  # 40 and 400 prompts
    python benchmarks/bench_diff_memory.py --prompts 40 --d-sae 65536
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys, time, torch
torch.set_num_threads(1)
from saediff.diff.data import DiffConfig
from saediff.diff.differ import run_diff
sae, prompts, n, gb = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
from saediff.organism import organism_path
ORGANISM_DIR = organism_path()
kw = {} if gb <= 0 else {"max_memory_gb": gb}
cfg = DiffConfig(base=str(ORGANISM_DIR / "base"), finetuned=[str(ORGANISM_DIR / "finetuned")], sae=sae,
                 layer=1, prompts=prompts, responses_from="none", max_prompts=n, n_boot=200, **kw)
t = time.perf_counter()
res = run_diff(cfg)
print(json.dumps({"prompts": n, "tokens": res.meta["n_tokens"], "s": time.perf_counter() - t,
                  "top": [r["latent"] for r in res.table[:5]],
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def make_sae(path: Path, d_sae: int, d_in: int) -> None:
    import torch
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(0)
    TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=32,
                          metadata=SAEMetadata(hook_name="blocks.1.hook_resid_post"))).save_model(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=40)
    ap.add_argument("--d-sae", type=int, default=32768)
    ap.add_argument("--max-memory-gb", type=float, default=0.0, help="0 = the differ's default")
    args = ap.parse_args()
    from saediff.prompts import load_prompt_items

    with tempfile.TemporaryDirectory() as d:
        make_sae(Path(d) / "sae", args.d_sae, 96)
        qs = [r["prompt"] for r in load_prompt_items("organism", 50)]
        with open(Path(d) / "p.jsonl", "w") as f:
            for i in range(10 * args.prompts):
                f.write(json.dumps({"prompt": qs[i % len(qs)]}) + "\n")
        out = []
        for n in (args.prompts, 10 * args.prompts):
            r = subprocess.run([sys.executable, "-c", CHILD, str(Path(d) / "sae"), str(Path(d) / "p.jsonl"),
                                str(n), str(args.max_memory_gb)], capture_output=True, text=True,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"})
            if r.returncode:
                sys.exit(r.stderr[-3000:])
            out.append(json.loads(r.stdout.strip().splitlines()[-1]))
            print(json.dumps(out[-1]))
    print(f"d_sae {args.d_sae}: peak RSS {out[0]['peak_rss_mb']:.0f} MB at {out[0]['prompts']} prompts "
          f"({out[0]['tokens']} tokens), {out[1]['peak_rss_mb']:.0f} MB at {out[1]['prompts']} "
          f"({out[1]['tokens']} tokens); 10x/1x = {out[1]['peak_rss_mb'] / out[0]['peak_rss_mb']:.2f}")


if __name__ == "__main__":
    main()
