"""`saediff cache --layers A,B,C` (one forward pass per batch) ÷ three single-layer cache runs.

Wall time and process CPU time (all threads; on a shared machine the steadier of the two) of
the whole command each way (model loading, tokenising, forward, HDF5 writes),
base + fine-tuned (the real organism's rank-1 adapter) on SmolLM2-135M-Instruct, measured
side by side in one run; arms interleaved so machine noise hits both alike. Also checks that
the multi-layer rows equal the single-layer caches' rows.

    python benchmarks/bench_layers.py [--model /tmp/smollm2] [--tokens 6000] [--sets 12,15,18 6,15,24]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from saediff.cache.format import open_cache  # noqa: E402
from saediff.cache.writer import CacheConfig, build_cache  # noqa: E402
from saediff.layerspec import parse_layers  # noqa: E402

import tiny  # noqa: E402


def write_text(path: Path, tokens: int) -> Path:
    import random

    rng = random.Random(0)
    with path.open("w") as fh:
        for _ in range(tokens // 40 + 8):
            fh.write(json.dumps({"text": " ".join(rng.choice(tiny.WORDS) for _ in range(60))})
                     + "\n")
    return path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", help="HF dir (default: the imported SmolLM2-135M-Instruct)")
    ap.add_argument("--adapter", help="fine-tuned side: PEFT adapter on --model "
                                      "(default: the real organism's adapter_rank1)")
    ap.add_argument("--tokens", type=int, default=6000)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--sets", nargs="+", default=["12,15,18", "6,15,24"])
    args = ap.parse_args()
    from saediff.organism.real import real_base_path, real_organism_path

    model = args.model or str(real_base_path())
    adapter = args.adapter or str(real_organism_path() / "adapter_rank1")
    tmp = Path(tempfile.mkdtemp())
    data = write_text(tmp / "docs.jsonl", args.tokens)

    def cfg(name: str, **kw) -> CacheConfig:
        return CacheConfig(base=model, finetuned_adapter=adapter, dataset=str(data),
                           max_tokens=args.tokens, ctx_len=128, batch_size=8,
                           out=str(tmp / f"{name}.h5"), overwrite=True, **kw)

    # warm-up: the first build in a process pays one-off costs (file cache, lazy imports)
    build_cache(dataclasses.replace(cfg("warm", layer=0), max_tokens=64))
    report: dict = {"model": model, "adapter": adapter, "tokens": args.tokens, "sets": {}}
    for spec in args.sets:
        layers = parse_layers(spec)
        times: dict[str, list[float]] = {"multi": [], "singles": [], "multi_cpu": [],
                                         "singles_cpu": []}
        for _ in range(args.repeats):
            t, c = time.perf_counter(), time.process_time()
            build_cache(cfg("multi", layers=spec))
            times["multi"].append(time.perf_counter() - t)
            times["multi_cpu"].append(time.process_time() - c)
            t, c = time.perf_counter(), time.process_time()
            for x in layers:
                build_cache(cfg(f"single{x}", layer=x))
            times["singles"].append(time.perf_counter() - t)
            times["singles_cpu"].append(time.process_time() - c)
        equal = True
        for x in layers:
            with open_cache(tmp / "multi.h5", layer=x) as m, open_cache(tmp / f"single{x}.h5") as s:
                for src in ("base", "finetuned"):
                    equal &= bool(np.array_equal(m.raw_activations(src, 0, m.rows),
                                                 s.raw_activations(src, 0, s.rows)))
        med = {k: statistics.median(v) for k, v in times.items()}
        report["sets"][spec] = {"multi_s": round(med["multi"], 1),
                                "three_singles_s": round(med["singles"], 1),
                                "ratio": round(med["multi"] / med["singles"], 3),
                                "multi_cpu_s": round(med["multi_cpu"], 1),
                                "three_singles_cpu_s": round(med["singles_cpu"], 1),
                                "cpu_ratio": round(med["multi_cpu"] / med["singles_cpu"], 3),
                                "rows_equal": equal}
        print(json.dumps({spec: report["sets"][spec]}), flush=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
