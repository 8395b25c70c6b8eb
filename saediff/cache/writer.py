"""Stage 1: stream one layer's activations of one or two models into an HDF5 cache.

Both models see the same token ids in the same pass, so row i is the same token for both.
The writer commits after every batch (rows written, flushed, then the committed counter
bumped and flushed); a rerun of the same command resumes after the last commit.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import h5py
import numpy as np
import torch
from tqdm.auto import tqdm

import saediff
from saediff.cache.format import (INDEX_FIELDS, P_COMPLETE, P_ROWS, P_SEQS, SCHEMA_VERSION,
                               partial_path, read_attrs)
from saediff.cache.durable import (CacheWriteError, close_quietly, roll_back_to_readable,
                                   open_partial, reserve, write_cause)
from saediff.errors import SaediffError
from saediff.cache.documents import dataset_spec, iter_sequences
from saediff.io import check_writable_file
from saediff.models import (LoadedModel, check_same_tokenizer,
                            load_model, pad_batch, run_to_layer, tokenizer_fingerprint)

log = logging.getLogger(__name__)


@dataclass
class CacheConfig:
    base: str
    """Base (aligned) model: local HF directory or hub name."""
    layer: int
    """Cache the residual stream after this block (HF hidden_states[layer+1])."""
    dataset: str
    """Local .jsonl/.json/.parquet/.txt file or a `datasets` hub name (streamed)."""
    out: str = "activations_cache/cache.h5"
    """Output HDF5 file (written as OUT.partial until complete)."""
    base_adapter: str | None = None
    """PEFT adapter directory applied on top of --base."""
    finetuned: str | None = None
    """Fine-tuned model (local dir or hub name); adds a second source `finetuned`."""
    finetuned_adapter: str | None = None
    """PEFT adapter for the fine-tuned side (on --finetuned, or on --base if not given)."""
    text_field: str = "text"
    """Field holding plain text (ignored when --prompt-field is given)."""
    prompt_field: str | None = None
    """Field holding the user prompt: switches to chat mode (chat template + role mask)."""
    response_field: str | None = None
    """Field holding the assistant response (chat mode)."""
    split: str = "train"
    """Dataset split for hub datasets."""
    max_tokens: int = 1_000_000
    """Stop after this many cached rows (tokens)."""
    ctx_len: int = 256
    """Maximum tokens per model input; longer texts are split, longer chats truncated."""
    batch_size: int = 16
    """Sequences per forward pass."""
    dtype: Literal["float16", "float32"] = "float16"
    """Storage dtype of activations."""
    device: str = "cpu"
    """Torch device for the models (cpu, cuda, cuda:1, ...)."""
    overwrite: bool = False
    """Replace an existing cache whose provenance differs (or a finished one)."""

    def __post_init__(self) -> None:
        if self.layer < 0:
            raise SaediffError(f"layer must be >= 0, got {self.layer}")
        if self.max_tokens <= 0:
            raise SaediffError(f"max_tokens must be > 0, got {self.max_tokens}")
        if self.ctx_len < 2:
            raise SaediffError(f"ctx_len must be >= 2, got {self.ctx_len}")
        if self.batch_size < 1:
            raise SaediffError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.response_field and not self.prompt_field:
            raise SaediffError("response_field needs prompt_field (chat mode)")
        if self.finetuned_adapter and not self.finetuned:
            self.finetuned = self.base  # base + adapter is the fine-tuned model

    @property
    def chat(self) -> bool:
        return self.prompt_field is not None


# --- writer ----------------------------------------------------------------------------------

@contextlib.contextmanager
def _writer_lock(out: Path) -> Iterator[None]:
    """An exclusive flock on OUT.lock, removed again when the command ends (success or not)."""
    lock_path = Path(str(out) + ".lock")
    while True:
        fh = lock_path.open("a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise SaediffError(f"another writer is already writing {out} (pid {holder}); "
                               "wait for it or stop it first") from None
        # a writer that just finished unlinks the file it held: lock the one on disk
        if lock_path.exists() and os.stat(lock_path).st_ino == os.fstat(fh.fileno()).st_ino:
            break
        fh.close()
    try:
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        yield
    finally:
        lock_path.unlink(missing_ok=True)  # still held: no one else can be inside
        fh.close()  # closing releases the flock


def _provenance(cfg: CacheConfig, models: dict[str, LoadedModel]) -> dict[str, Any]:
    first = next(iter(models.values()))
    return {
        "schema_version": SCHEMA_VERSION,
        "saediff_version": saediff.__version__,
        "layer": cfg.layer,
        "hook_name": f"blocks.{cfg.layer}.hook_resid_post",
        "hf_hidden_states_index": cfg.layer + 1,
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


_COMPARED = ("layer", "dtype", "ctx_len", "max_tokens", "tokenizer_fingerprint", "sources",
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


def _create(path: Path, prov: dict[str, Any]) -> h5py.File:
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
    dt = np.dtype(prov["dtype"])
    rows_chunk = max(64, ACTS_CHUNK_BYTES // (d * dt.itemsize))
    acts = f.create_group("acts")
    for src in prov["sources"]:
        acts.create_dataset(src, shape=(0, d), maxshape=(None, d), chunks=(rows_chunk, d), dtype=dt,
                            fletcher32=True)
    f.create_dataset("progress", data=np.array([0, 0, 0, prov["max_tokens"]], dtype="i8"))
    f.flush()
    return f


def load_cache_models(cfg: CacheConfig) -> dict[str, LoadedModel]:
    models = {"base": load_model(cfg.base, cfg.base_adapter, device=cfg.device)}
    if cfg.finetuned:
        models["finetuned"] = load_model(cfg.finetuned, cfg.finetuned_adapter, device=cfg.device)
        check_same_tokenizer(models["base"], models["finetuned"])
    return models


def build_cache(cfg: CacheConfig, models: dict[str, LoadedModel] | None = None,
                shard: tuple[int, int] = (0, 1)) -> Path:
    """Write (or resume, or reuse) the cache described by `cfg`; returns the final path.

    `shard=(r, n)`: only documents with doc_id % n == r (one rank's shard, `cache.shards`)."""
    out = check_writable_file(cfg.out, "--out")  # before any model loads or runs
    part = partial_path(out)
    models = models or load_cache_models(cfg)
    for m in models.values():
        m.check_layer(cfg.layer)
        m.check_ctx_len(cfg.ctx_len)
    prov = _provenance(cfg, models)
    if shard[1] > 1:
        prov["shard"] = f"{shard[0]}/{shard[1]}"
    with _writer_lock(out):
        if out.exists():
            with h5py.File(out, "r") as f:
                diff = _provenance_diff(read_attrs(f), prov)
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
            f = _create(part, prov)
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
    dsets.update({f"acts/{src}": f["acts"][src] for src in models})
    dsets["seq_offsets"] = f["seq_offsets"]
    try:
        # Anything past the committed prefix is debris of a killed writer: drop it.
        for name, d in dsets.items():
            d.resize(seqs + 1 if name == "seq_offsets" else rows, axis=0)
    except (OSError, RuntimeError) as exc:
        raise CacheWriteError(f"cannot write {f.filename}: {exc}") from exc
    tok = models["base"].tokenizer
    np_dtype = np.dtype(cfg.dtype)
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
        acts = _forward_batch(batch, models, cfg.layer, tok.pad_token_id, np_dtype)
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


def _forward_batch(batch: list[tuple[int, list[int], list[int]]], models: dict[str, LoadedModel],
                   layer: int, pad_id: int, np_dtype: np.dtype) -> dict[str, np.ndarray]:
    ids, mask = pad_batch([b[1] for b in batch], pad_id)
    lens = [len(b[1]) for b in batch]
    acts = {}
    for src, lm in models.items():
        x32 = run_to_layer(lm, ids, mask, layer)[mask.bool()].float().cpu().numpy()
        x = x32.astype(np_dtype)
        for arr, what in ((x32, "NaN/inf"), (x, f"values beyond {np_dtype.name} range "
                                                  "(use --dtype float32)")):
            bad = ~np.isfinite(arr).all(axis=1)
            if bad.any():  # name the first bad token: document and position in its input
                i = int(np.argmax(bad))
                s = int(np.searchsorted(np.cumsum(lens), i, side="right"))
                pos = _first_bad_position(lm, batch[s][1], layer) \
                    if arr is x32 else i - sum(lens[:s])
                raise SaediffError(f"non-finite activations from {src} ({lm.name}): {what} at "
                                   f"document {batch[s][0]}, position {pos}")
        acts[src] = x
    return acts


def _first_bad_position(lm: LoadedModel, ids: list[int], layer: int) -> int:
    """Where a NaN enters: the shortest prefix whose last row is non-finite (causal model).

    Attention spreads one NaN key to every query of the sequence, so the first bad *row* is
    usually position 0; prefixes see only earlier tokens, and binary search finds the token.
    """
    def bad(n: int) -> bool:
        t = torch.tensor([ids[:n]])
        y = run_to_layer(lm, t, torch.ones_like(t), layer)[0, -1].float().cpu().numpy()
        return not np.isfinite(y).all()

    lo, hi = 1, len(ids)  # bad(hi) holds
    while lo < hi:
        mid = (lo + hi) // 2
        if bad(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo - 1


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
    for src, x in acts.items():
        d = dsets[f"acts/{src}"]
        d.resize(rows + n, axis=0)
        d[rows: rows + n] = x
    so = dsets["seq_offsets"]
    so.resize(seqs + len(batch) + 1, axis=0)
    so[seqs + 1:] = rows + np.cumsum(lens)
    return n

