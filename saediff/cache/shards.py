"""A cache written by several processes (`torchrun --nproc-per-node N -m saediff cache ...`).

Rank r of N caches the documents with doc_id % N == r into its own shard,
`OUT.shards/rankRRR-of-NNN.h5` (an ordinary resumable cache, checksummed), with
ceil(max_tokens / N) tokens. Rank 0 then writes `OUT` itself: the small index datasets copied
(sequence ids renumbered), the activations as HDF5 virtual datasets over the shards' rows, the
provenance of the run plus `world_size`. `open_cache(OUT)` reads it as one cache: rows are
grouped by shard, each document's rows are exactly those a 1-process run writes for it, and
`doc_ids` are global document indices. A rerun after a killed rank reuses finished shards,
resumes the partial ones and rewrites `OUT`.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path

import h5py
import numpy as np

from saediff import dist
from saediff.cache.format import INDEX_FIELDS, P_COMPLETE, P_ROWS, P_SEQS, open_cache
from saediff.cache.writer import CacheConfig, build_cache
from saediff.io import atomic_path

log = logging.getLogger(__name__)


def shard_path(out: str | Path, rank: int, world_size: int) -> Path:
    out = Path(out)
    return out.parent / f"{out.name}.shards" / f"rank{rank:03d}-of-{world_size:03d}.h5"


def build_cache_distributed(cfg: CacheConfig) -> Path:
    """`build_cache` under torchrun (one shard per rank, merged by rank 0); without torchrun
    exactly `build_cache(cfg)`."""
    with dist.process_group(cfg.device) as d:
        if not d.active:
            return build_cache(cfg)
        n = d.world_size
        shard_cfg = dataclasses.replace(cfg, out=str(shard_path(cfg.out, d.rank, n)),
                                        max_tokens=math.ceil(cfg.max_tokens / n),
                                        device=dist.rank_device(cfg.device))
        Path(shard_cfg.out).parent.mkdir(parents=True, exist_ok=True)
        build_cache(shard_cfg, shard=(d.rank, n))
        dist.barrier()
        if d.is_main:
            merge_shards(cfg.out, [shard_path(cfg.out, r, n) for r in range(n)], cfg.max_tokens)
        dist.barrier()
        return Path(cfg.out)


def merge_shards(out: str | Path, shards: list[Path], max_tokens: int) -> Path:
    """Write `out` as one cache over complete shard files (virtual activation datasets)."""
    out = Path(out)
    opened = [open_cache(p) for p in shards]
    try:
        rows = [c.rows for c in opened]
        seqs = [c.n_sequences for c in opened]
        first = opened[0]
        with atomic_path(out) as tmp, h5py.File(tmp, "w") as f:
            for k, v in first._f.attrs.items():
                if k != "shard":
                    f.attrs[k] = v
            f.attrs["max_tokens"] = max_tokens
            f.attrs["world_size"] = len(shards)
            f.attrs["shards"] = json.dumps([str(p.relative_to(out.parent)) for p in shards])
            for name, dt in INDEX_FIELDS.items():
                parts = []
                for i, c in enumerate(opened):
                    a = c._f[name][: rows[i]]
                    if name == "seq_ids":  # renumber: sequences of shard i follow shard i-1's
                        a = a + sum(seqs[:i])
                    parts.append(a)
                f.create_dataset(name, data=np.concatenate(parts).astype(dt), fletcher32=True)
            offs = [np.zeros(1, dtype="i8")] + [c._f["seq_offsets"][1: seqs[i] + 1] + sum(rows[:i])
                                                 for i, c in enumerate(opened)]
            f.create_dataset("seq_offsets", data=np.concatenate(offs), fletcher32=True)
            f.create_group("acts")
            for name in first.activation_datasets():  # every source (of every layer)
                shape = (sum(rows), first.d_model)
                layout = h5py.VirtualLayout(shape=shape, dtype=first._f[name].dtype)
                at = 0
                for p, c, r in zip(shards, opened, rows):
                    # relative to `out`'s folder, so the pair can be moved together
                    vs = h5py.VirtualSource(str(p.relative_to(out.parent)), name,
                                            shape=c._f[name].shape)
                    layout[at: at + r] = vs[:r]
                    at += r
                f.create_virtual_dataset(name, layout)
            prog = np.zeros(4, dtype="i8")
            prog[P_ROWS], prog[P_SEQS], prog[P_COMPLETE] = sum(rows), sum(seqs), 1
            prog[3] = max_tokens
            f.create_dataset("progress", data=prog)
    finally:
        for c in opened:
            c.close()
    log.info("merged %d shards into %s (%d rows)", len(shards), out, sum(rows))
    return out
