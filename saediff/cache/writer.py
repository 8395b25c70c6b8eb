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

import saediff
from saediff.cache.format import (INDEX_FIELDS, P_COMPLETE, P_ROWS, P_SEQS, SCHEMA_VERSION,
                               STORED_DTYPES, partial_path, read_attrs)
from saediff.cache.durable import (CacheWriteError, close_quietly, roll_back_to_readable,
                                   open_partial, reserve, write_cause)
from saediff.errors import SaediffError
from saediff.cache.documents import dataset_spec, iter_sequences
from saediff.cache.forward import forward_batch as _forward_batch  # tests patch this name
from saediff.cache.source import ModelSource, load_source_models
from saediff.io import check_writable_file, output_lock
from saediff.bridge import as_loaded_model
from saediff.models import LoadedModel, tokenizer_fingerprint

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


def _provenance(cfg: CacheConfig, models: dict[str, LoadedModel]) -> dict[str, Any]:
    first = next(iter(models.values()))
    where: dict[str, Any] = {"layer": cfg.layer, "hook_name": f"blocks.{cfg.layer}.hook_resid_post",
                             "hf_hidden_states_index": cfg.layer + 1} if not cfg.layers else \
        {"layers": cfg.layers, "hook_names": [f"blocks.{x}.hook_resid_post" for x in cfg.layers]}
    return {
        "schema_version": SCHEMA_VERSION,
        "saediff_version": saediff.__version__,
        **where,
        "d_model": first.d_model,
        "dtype": cfg.dtype,
        "ctx_len": cfg.ctx_len,
        "max_tokens": cfg.max_tokens,
        "tokenizer_fingerprint": tokenizer_fingerprint(first.tokenizer),
        "vocab_size": len(first.tokenizer),
        "sources": list(models),
        "models": {k: m.provenance() for k, m in models.items()},
        "dataset": dataset_spec(cfg),
    }


_COMPARED = ("layer", "layers", "dtype", "ctx_len", "max_tokens", "tokenizer_fingerprint", "sources",
             "models", "dataset", "d_model", "shard")


def _comparable(prov: dict[str, Any]) -> dict[str, str]:
    out = {k: prov.get(k) for k in _COMPARED}
    ds = dict(out["dataset"] or {})
    if "sha256" in ds:  # a local file is identified by its content, not where it lies
        ds.pop("source", None)
    out["dataset"] = ds
    return {k: json.dumps(v, sort_keys=True) for k, v in out.items()}


def _provenance_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    a, b = _comparable(old), _comparable(new)
    return [k for k in _COMPARED if a[k] != b[k]]


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


def _existing_diff(out: Path, prov: dict[str, Any], overwrite: bool) -> list[str]:
    """Provenance fields where the cache at `out` differs; a file there that is no HDF5 cache
    is refused (or, with --overwrite, replaced like any other)."""
    try:
        with h5py.File(out, "r") as f:
            return _provenance_diff(read_attrs(f), prov)
    except OSError as exc:
        if overwrite:
            return ["not an HDF5 cache"]
        raise SaediffError(f"--out {out} exists and is not an HDF5 cache ({exc.__class__.__name__}"
                           "); choose another --out, or pass --overwrite to replace it") from exc


def load_cache_models(cfg: CacheConfig) -> dict[str, LoadedModel]:
    return load_source_models(cfg)


def build_cache(cfg: CacheConfig, models: dict[str, LoadedModel] | None = None,
                shard: tuple[int, int] = (0, 1)) -> Path:
    """Write (or resume, or reuse) the cache described by `cfg`; returns the final path.

    `shard=(r, n)`: only documents with doc_id % n == r (one rank's shard, `cache.shards`)."""
    from saediff.layerspec import check_layer_range, config_n_layers

    out = check_writable_file(cfg.out, "--out")  # before any model loads or runs
    part = partial_path(out)
    flag = "--layers" if cfg.layers else "--layer"
    check_layer_range(cfg.cache_layers, config_n_layers(cfg.base), cfg.base, flag)  # no weights yet
    # a TransformerBridge is unwrapped to the HF model it runs
    models = {k: as_loaded_model(m) for k, m in models.items()} if models \
        else load_cache_models(cfg)
    for m in models.values():
        check_layer_range(cfg.cache_layers, m.n_layers, m.name, flag)
        m.check_ctx_len(cfg.ctx_len)
    prov = _provenance(cfg, models)
    if shard[1] > 1:
        prov["shard"] = f"{shard[0]}/{shard[1]}"
    with _writer_lock(out):
        if out.exists():
            diff = _existing_diff(out, prov, cfg.overwrite)
            if not diff and not cfg.overwrite:
                log.info("%s is already complete with the same provenance; nothing to do", out)
                return out
            if diff and not cfg.overwrite:
                raise SaediffError(f"{out} exists with different provenance ({', '.join(diff)}); "
                                   "pass --overwrite to replace it or choose another --out")
            # --overwrite: the old cache stays until the new one is complete (os.replace below)
        f = None
        if part.exists() and not cfg.overwrite:
            try:
                f = open_partial(part)
            except OSError as exc:
                raise SaediffError(f"{part} (an interrupted cache) is unreadable: {exc}; "
                                   "pass --overwrite to start again") from exc
            diff = _provenance_diff(read_attrs(f), prov)
            if diff and int(f["progress"][P_ROWS]):
                f.close()
                raise SaediffError(f"{part} is an interrupted cache with different provenance "
                                   f"({', '.join(diff)}); pass --overwrite to start again")
            if roll_back_to_readable(f, part) == 0:  # nothing (readable) committed: start afresh
                f.close()
                f = None
        if f is None:
            f = _create(part, prov, cfg.acts_names(list(models)))
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
        try:
            used = f.id.get_filesize()  # HDF5's own extent, without the blocks _reserve claimed
            f.close()
            if part.stat().st_size > used:
                os.truncate(part, used)
        except (OSError, RuntimeError) as exc:
            raise CacheWriteError(f"cannot write {part}: {exc}; free space and rerun to resume "
                                  "(the committed prefix is kept)") from exc
        os.replace(part, out)
    log.debug("wrote %s", out)
    return out


def _fill(f: h5py.File, cfg: CacheConfig, models: dict[str, LoadedModel],
          shard: tuple[int, int] = (0, 1)) -> None:
    prog = f["progress"]
    rows, seqs = int(prog[P_ROWS]), int(prog[P_SEQS])
    if rows:
        log.info("resuming %s after %d committed rows (%d sequences)", f.filename, rows, seqs)
    # One handle per dataset for the whole run: h5py flushes a dataset's chunk cache when its
    # handle is dropped and *swallows* errors there (disk full went unnoticed that way).
    dsets = {name: f[name] for name in INDEX_FIELDS}
    dsets.update({name: f[name] for name in cfg.acts_names(list(models))})
    dsets["seq_offsets"] = f["seq_offsets"]
    try:
        # Anything past the committed prefix is debris of a killed writer: drop it.
        for name, d in dsets.items():
            d.resize(seqs + 1 if name == "seq_offsets" else rows, axis=0)
    except (OSError, RuntimeError) as exc:
        raise CacheWriteError(f"cannot write {f.filename}: {exc}") from exc
    tok = models["base"].tokenizer
    stream = iter_sequences(cfg, tok, shard)
    for _ in range(seqs):  # cheap: tokenisation only, no model
        next(stream, None)
    bar = tqdm(total=cfg.max_tokens, initial=rows, unit="tok", unit_scale=True, desc="cache",
               disable=None)
    batch: list[tuple[int, list[int], list[int]]] = []
    exhausted = False
    while rows < cfg.max_tokens and not exhausted:
        batch.clear()
        budget = cfg.max_tokens - rows
        while len(batch) < cfg.batch_size and budget > 0:
            item = next(stream, None)
            if item is None:
                exhausted = True
                break
            if len(item[1]) > budget:  # cut the last sequence at exactly max_tokens
                item = (item[0], item[1][:budget], item[2][:budget])
            budget -= len(item[1])
            batch.append(item)
        if not batch:
            break
        acts = _forward_batch(batch, models, cfg.layers or [cfg.layer], tok.pad_token_id,
                              cfg.dtype)
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
        rows += n
        seqs += len(batch)
        bar.update(n)
    bar.close()
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

