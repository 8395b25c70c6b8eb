"""Stage 1: stream one layer's activations of one or two models into an HDF5 cache.

Both models see the same token ids in the same pass, so row i is the same token for both.
The writer commits after every batch (rows written, flushed, then the committed counter
bumped and flushed); a rerun of the same command resumes after the last commit.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import h5py
import numpy as np
from tqdm.auto import tqdm

from saediff.bridge import as_loaded_model
from saediff.cache.documents import iter_sequences
from saediff.cache.durable import (
    CacheWriteError,
    close_quietly,
    open_partial,
    reserve,
    roll_back_to_readable,
    write_cause,
)
from saediff.cache.format import INDEX_FIELDS, P_COMPLETE, P_ROWS, P_SEQS, STORED_DTYPES, partial_path, read_attrs
from saediff.cache.forward import forward_batch as _forward_batch  # tests patch this name
from saediff.cache.provenance import existing_diff, provenance, provenance_diff
from saediff.cache.source import ModelSource, load_source_models
from saediff.errors import SaediffError
from saediff.io import check_writable_file, output_lock, promote
from saediff.models import LoadedModel

log = logging.getLogger(__name__)


@dataclass
class CacheConfig(ModelSource):
    """`saediff cache`: the shared model/document options (`ModelSource`) plus these."""

    HELP_REQUIRED: ClassVar[tuple[str, ...]] = ("base", "dataset")  # --help says so

    layers: str | list[int] | None = None
    """Cache several blocks in one forward pass: a list and/or ranges (6,12,18 or 0-29)."""
    out: str = "activations_cache/cache.h5"
    """Output HDF5 file (written as OUT.partial until complete)."""
    max_tokens: int = 1_000_000
    """Stop after this many cached rows (tokens)."""
    batch_size: int = 16
    """Sequences per forward pass."""
    dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    """Storage dtype of activations (bfloat16: float32's range at float16's size)."""
    overwrite: bool = False
    """Replace an existing cache whose provenance differs (or a finished one)."""

    def __post_init__(self) -> None:
        from saediff.layerspec import parse_layers

        if self.layers is not None:
            wanted = parse_layers(self.layers)
            if self.layer is not None and wanted != [self.layer]:
                raise SaediffError(f"give --layer or --layers, not both (--layer {self.layer}, "
                                   f"--layers {self.layers})")
            self.layer = wanted[0] if len(wanted) == 1 else None
            self.layers = wanted if len(wanted) > 1 else None
        elif self.layer is None:
            raise SaediffError("give the block to cache: --layer L, or --layers 6,12,18 / 0-29")
        super().__post_init__()
        self.require_source("CacheConfig", need_layer=False)
        if self.max_tokens <= 0:
            raise SaediffError(f"max_tokens must be > 0, got {self.max_tokens}")
        if self.batch_size < 1:
            raise SaediffError(f"batch_size must be >= 1, got {self.batch_size}")

    @property
    def cache_layers(self) -> list[int]:
        """Every block this cache holds (one for --layer)."""
        return list(self.layers) if self.layers else [int(self.layer)]  # type: ignore[arg-type]

    def acts_names(self, sources: list[str]) -> list[str]:
        """Activation dataset names, one per (layer, source)."""
        from saediff.cache.format import acts_dataset

        if not self.layers:
            return [acts_dataset(s) for s in sources]
        return [acts_dataset(s, x) for x in self.layers for s in sources]


# --- writer ----------------------------------------------------------------------------------

@contextlib.contextmanager
def _writer_lock(out: Path) -> Iterator[None]:
    # `OUT.lock`, removed on release (saediff.io.output_lock); never re-entered, even in-process
    with output_lock(out, "--out", reentrant=False, directory=False):
        yield


# Chunk sizes. The chunk holding the commit point is rewritten by every batch, so small chunks
# keep that rewrite (and what a kill during it can tear, `format.readable_prefix`) cheap.
INDEX_CHUNK_ROWS = 8192
ACTS_CHUNK_BYTES = 1 << 18


def _create(path: Path, prov: dict[str, Any], acts_names: list[str] | None = None) -> h5py.File:
    f = h5py.File(path, "w")
    for k, v in prov.items():
        f.attrs[k] = json.dumps(v) if isinstance(v, (dict, list)) else v
    # Fletcher-32 on every chunk: a flipped byte on disk is a read error, not silent garbage.
    for name, dt in INDEX_FIELDS.items():
        f.create_dataset(name, shape=(0,), maxshape=(None,), chunks=(INDEX_CHUNK_ROWS,), dtype=dt,
                         fletcher32=True)
    f.create_dataset("seq_offsets", data=np.zeros(1, dtype="i8"), maxshape=(None,), chunks=(8192,),
                     fletcher32=True)
    d = prov["d_model"]
    dt = STORED_DTYPES[prov["dtype"]]
    rows_chunk = max(64, ACTS_CHUNK_BYTES // (d * dt.itemsize))
    f.create_group("acts")
    for name in acts_names or [f"acts/{src}" for src in prov["sources"]]:
        ds = f.create_dataset(name, shape=(0, d), maxshape=(None, d), chunks=(rows_chunk, d),
                              dtype=dt, fletcher32=True)
        ds.attrs["saediff_dtype"] = prov["dtype"]  # says how to read uint16 words (bfloat16)
    f.create_dataset("progress", data=np.array([0, 0, 0, prov["max_tokens"]], dtype="i8"))
    f.flush()
    return f


def load_cache_models(cfg: CacheConfig) -> dict[str, LoadedModel]:
    return load_source_models(cfg)


def build_cache(cfg: CacheConfig, models: dict[str, LoadedModel] | None = None,
                shard: tuple[int, int] = (0, 1)) -> Path:
    """Write (or resume, or reuse) the cache described by `cfg`; returns the final path.

    `shard=(r, n)`: only documents with doc_id % n == r (one rank's shard, `cache.shards`)."""
    out = check_writable_file(cfg.out, "--out")  # before any model loads or runs
    models = _checked_models(cfg, models)
    prov = provenance(cfg, models)
    if shard[1] > 1:
        prov["shard"] = f"{shard[0]}/{shard[1]}"
    with _writer_lock(out):
        if _already_complete(out, prov, cfg.overwrite):
            return out
        part = partial_path(out)
        f = _resume_or_create(part, prov, cfg, list(models))
        _fill_or_clean_up(f, part, cfg, models, shard)
        _close_trimmed(f, part)
        promote(part, out)  # --overwrite: the old cache stayed until this rename
    log.debug("wrote %s", out)
    return out


def _checked_models(cfg: CacheConfig, models: dict[str, LoadedModel] | None
                    ) -> dict[str, LoadedModel]:
    """The given models (a TransformerBridge unwrapped to the HF model it runs) or the loaded
    ones; the layers and --ctx-len fit each (the layer range is checked before any weights)."""
    from saediff.layerspec import check_layer_range, config_n_layers

    flag = "--layers" if cfg.layers else "--layer"
    check_layer_range(cfg.cache_layers, config_n_layers(cfg.base), cfg.base, flag)
    models = {k: as_loaded_model(m) for k, m in models.items()} if models \
        else load_cache_models(cfg)
    for m in models.values():
        check_layer_range(cfg.cache_layers, m.n_layers, m.name, flag)
        m.check_ctx_len(cfg.ctx_len)
    return models


def _already_complete(out: Path, prov: dict[str, Any], overwrite: bool) -> bool:
    """True when `out` is complete with the same provenance (nothing to do); refuses a
    different one unless `overwrite`."""
    if not out.exists():
        return False
    diff = existing_diff(out, prov, overwrite)
    if not diff and not overwrite:
        log.info("%s is already complete with the same provenance; nothing to do", out)
        return True
    if diff and not overwrite:
        raise SaediffError(f"{out} exists with different provenance ({', '.join(diff)}); "
                           "pass --overwrite to replace it or choose another --out")
    return False


def _resume_or_create(part: Path, prov: dict[str, Any], cfg: CacheConfig,
                      sources: list[str]) -> h5py.File:
    """The interrupted cache `part` rolled back to its last readable commit (same provenance),
    or a new one."""
    f = None
    if part.exists() and not cfg.overwrite:
        try:
            f = open_partial(part)
        except OSError as exc:
            raise SaediffError(f"{part} (an interrupted cache) is unreadable: {exc}; "
                               "pass --overwrite to start again") from exc
        diff = provenance_diff(read_attrs(f), prov)
        if diff and int(f["progress"][P_ROWS]):
            f.close()
            raise SaediffError(f"{part} is an interrupted cache with different provenance "
                               f"({', '.join(diff)}); pass --overwrite to start again")
        if roll_back_to_readable(f, part) == 0:  # nothing (readable) committed: start afresh
            f.close()
            f = None
    return f if f is not None else _create(part, prov, cfg.acts_names(sources))


def _fill_or_clean_up(f: h5py.File, part: Path, cfg: CacheConfig,
                      models: dict[str, LoadedModel], shard: tuple[int, int]) -> None:
    try:
        _fill(f, cfg, models, shard)
    except CacheWriteError:
        # The file may hold unflushed debris; closing must not hide the error, and the
        # counter on disk still names only flushed rows, so a rerun resumes correctly.
        close_quietly(f)
        raise
    except BaseException as exc:
        empty = int(f["progress"][P_ROWS]) == 0
        f.close()
        # Bad input fails the same way on every rerun: leave no resumable-looking partial.
        # An interrupt (Ctrl-C) keeps the committed prefix for the rerun.
        if empty or isinstance(exc, SaediffError):
            part.unlink(missing_ok=True)
        raise


def _close_trimmed(f: h5py.File, part: Path) -> None:
    """Close the complete file and give back the blocks `reserve` claimed beyond its end."""
    try:
        used = f.id.get_filesize()  # HDF5's own extent, without the blocks _reserve claimed
        f.close()
        if part.stat().st_size > used:
            os.truncate(part, used)
    except (OSError, RuntimeError) as exc:
        raise CacheWriteError(f"cannot write {part}: {exc}; free space and rerun to resume "
                              "(the committed prefix is kept)") from exc


def _fill(f: h5py.File, cfg: CacheConfig, models: dict[str, LoadedModel],
          shard: tuple[int, int] = (0, 1)) -> None:
    """Forward batches and append them after the committed prefix until --max-tokens (or the
    dataset's end); each batch is flushed before the progress counter names it."""
    prog = f["progress"]
    rows, seqs = int(prog[P_ROWS]), int(prog[P_SEQS])
    if rows:
        log.info("resuming %s after %d committed rows (%d sequences)", f.filename, rows, seqs)
    dsets = _datasets_at_commit(f, cfg, list(models), rows, seqs)
    tok = models["base"].tokenizer
    stream = iter_sequences(cfg, tok, shard)
    for _ in range(seqs):  # cheap: tokenisation only, no model
        next(stream, None)
    bar = tqdm(total=cfg.max_tokens, initial=rows, unit="tok", unit_scale=True, desc="cache",
               disable=None)
    exhausted = False
    while rows < cfg.max_tokens and not exhausted:
        batch, exhausted = _next_batch(stream, cfg.batch_size, cfg.max_tokens - rows)
        if not batch:
            break
        acts = _forward_batch(batch, models, cfg.layers or [cfg.layer], tok.pad_token_id,
                              cfg.dtype)
        n = _commit_batch(f, prog, dsets, rows, seqs, batch, acts)
        rows += n
        seqs += len(batch)
        bar.update(n)
    bar.close()
    _mark_complete(f, prog, cfg, rows, seqs, exhausted)


Batch = list[tuple[int, list[int], list[int]]]


def _datasets_at_commit(f: h5py.File, cfg: CacheConfig, sources: list[str], rows: int,
                        seqs: int) -> dict[str, h5py.Dataset]:
    """One handle per dataset, each cut back to the committed prefix (anything past it is
    debris of a killed writer)."""
    # One handle per dataset for the whole run: h5py flushes a dataset's chunk cache when its
    # handle is dropped and *swallows* errors there (disk full went unnoticed that way).
    dsets = {name: f[name] for name in INDEX_FIELDS}
    dsets.update({name: f[name] for name in cfg.acts_names(sources)})
    dsets["seq_offsets"] = f["seq_offsets"]
    try:
        for name, d in dsets.items():
            d.resize(seqs + 1 if name == "seq_offsets" else rows, axis=0)
    except (OSError, RuntimeError) as exc:
        raise CacheWriteError(f"cannot write {f.filename}: {exc}") from exc
    return dsets


def _next_batch(stream: Iterator[Any], batch_size: int, budget: int) -> tuple[Batch, bool]:
    """Up to `batch_size` sequences holding at most `budget` tokens (the last one cut at
    exactly the budget); and whether the stream ran out."""
    batch: Batch = []
    while len(batch) < batch_size and budget > 0:
        item = next(stream, None)
        if item is None:
            return batch, True
        if len(item[1]) > budget:  # cut the last sequence at exactly max_tokens
            item = (item[0], item[1][:budget], item[2][:budget])
        budget -= len(item[1])
        batch.append(item)
    return batch, False


def _commit_batch(f: h5py.File, prog: h5py.Dataset, dsets: dict[str, h5py.Dataset], rows: int,
                  seqs: int, batch: Batch, acts: dict[str, np.ndarray]) -> int:
    """Write one batch, flush it, then advance the progress counter (the commit)."""
    try:
        reserve(f, dsets, rows, seqs, batch)
        n = _write_batch(dsets, batch, rows, seqs, acts)
        f.flush()  # the rows first: the counter may only ever name flushed data
        prog[P_ROWS], prog[P_SEQS] = rows + n, seqs + len(batch)  # the commit
        f.flush()
    except (OSError, RuntimeError) as exc:  # OSError from _reserve: nothing was written
        raise CacheWriteError(f"cannot write {f.filename}: {write_cause(exc)}; free space (or fix "
                              f"the cause) and rerun to resume after {rows} committed rows"
                              ) from exc
    return n


def _mark_complete(f: h5py.File, prog: h5py.Dataset, cfg: CacheConfig, rows: int, seqs: int,
                   exhausted: bool) -> None:
    if rows == 0:
        raise SaediffError(f"dataset {cfg.dataset} produced no tokens")
    if exhausted and rows < cfg.max_tokens:
        log.info("dataset %s ran out after %d of --max-tokens %d tokens (%d sequences): the "
                 "cache holds all of it", cfg.dataset, rows, cfg.max_tokens, seqs)
    try:
        prog[P_COMPLETE] = 1
        f.flush()
    except (OSError, RuntimeError) as exc:
        raise CacheWriteError(f"cannot write {f.filename}: {write_cause(exc)}; free space and rerun "
                              "to finish") from exc


def _write_batch(dsets: dict[str, h5py.Dataset], batch: list[tuple[int, list[int], list[int]]],
                 rows: int, seqs: int, acts: dict[str, np.ndarray]) -> int:
    lens = [len(b[1]) for b in batch]
    n = sum(lens)
    index = {
        "tokens": np.concatenate([b[1] for b in batch]),
        "roles": np.concatenate([b[2] for b in batch]),
        "doc_ids": np.repeat([b[0] for b in batch], lens),
        "seq_ids": np.repeat(np.arange(seqs, seqs + len(batch)), lens),
        "positions": np.concatenate([np.arange(k) for k in lens]),
    }
    for name, arr in index.items():
        d = dsets[name]
        d.resize(rows + n, axis=0)
        d[rows: rows + n] = arr
    for name, x in acts.items():
        d = dsets[name]
        d.resize(rows + n, axis=0)
        d[rows: rows + n] = x
    so = dsets["seq_offsets"]
    so.resize(seqs + len(batch) + 1, axis=0)
    so[seqs + 1:] = rows + np.cumsum(lens)
    return n

