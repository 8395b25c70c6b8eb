"""Documents and model inputs of a cache: the dataset read as documents, each document turned
into deterministic token sequences (chat template + role masks, or plain-text chunks).

A document's sequences never depend on other documents, which is what lets several ranks
split a dataset by document (`saediff.cache.shards`).
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from saediff.errors import SaediffError
from saediff.models import encode_chat, encode_text

# `cfg` below is a `saediff.cache.writer.CacheConfig` (not imported: the writer imports us)

_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def dataset_spec(cfg: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"source": cfg.dataset, "split": cfg.split}
    spec.update({"prompt_field": cfg.prompt_field, "response_field": cfg.response_field}
                if cfg.chat else {"text_field": cfg.text_field})
    p = Path(cfg.dataset)
    if p.is_file():
        spec["sha256"] = _file_hash(p)
    return spec


def iter_documents(source: str, split: str = "train") -> Iterator[dict[str, Any]]:
    """Stream examples from a local file or a hub dataset (never loads it whole)."""
    import datasets

    datasets.disable_progress_bars()
    p = Path(source)
    if p.exists():
        builder = _BUILDERS.get(p.suffix)
        if builder is None:
            raise SaediffError(f"unsupported dataset file type {p.suffix!r} "
                               f"(use one of {sorted(_BUILDERS)})")
        if p.stat().st_size == 0:
            raise SaediffError(f"dataset {source} is empty")
        if builder in ("json", "text"):
            _check_utf8(p)
        ds = datasets.load_dataset(builder, data_files=str(p), split="train", streaming=True)
    elif source.endswith(tuple(_BUILDERS)) or os.sep in source and not source.count("/") == 1:
        raise FileNotFoundError(f"dataset file not found: {source}")
    else:
        ds = datasets.load_dataset(source, split=split, streaming=True)
    try:
        yield from ds
    except UnicodeDecodeError as exc:  # a hub dataset or a parquet string column
        raise SaediffError(f"dataset {source}: text is not UTF-8 ({exc.reason} at byte "
                           f"{exc.start} of a record); re-encode it as UTF-8") from exc


def _check_utf8(path: Path) -> None:
    """Refuse a non-UTF-8 text file up front, naming the line (the loader fails late, mid-run)."""
    with path.open("rb") as fh:
        for n, line in enumerate(fh, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise SaediffError(f"{path} line {n}: not UTF-8 (byte {exc.start} of the line, "
                                   f"{line[exc.start:exc.start + 1]!r}); re-encode the file as "
                                   "UTF-8") from exc


def iter_sequences(cfg: Any, tok: Any, shard: tuple[int, int] = (0, 1)
                   ) -> Iterator[tuple[int, list[int], list[int]]]:
    """(doc_id, token ids, roles) per model input, in a deterministic order.

    `shard=(r, n)` keeps documents with doc_id % n == r (rank r of n under torchrun); doc ids
    stay global, and a document's sequences never depend on the other documents.
    """
    n_docs = 0
    for doc_id, ex in enumerate(iter_documents(cfg.dataset, cfg.split)):
        n_docs += 1
        if doc_id % shard[1] != shard[0]:
            continue
        if cfg.chat:
            for key in (cfg.prompt_field, cfg.response_field):
                if key and key not in ex:
                    raise SaediffError(f"document {doc_id} has no field {key!r} "
                                       f"(fields: {sorted(ex)})")
            ids, roles = encode_chat(tok, str(ex[cfg.prompt_field]),
                                     str(ex[cfg.response_field]) if cfg.response_field else None)
            if len(ids) > cfg.ctx_len:
                ids, roles = ids[: cfg.ctx_len], roles[: cfg.ctx_len]
            if ids:
                yield doc_id, ids, roles
        else:
            if cfg.text_field not in ex:
                raise SaediffError(f"document {doc_id} has no field {cfg.text_field!r} "
                                   f"(fields: {sorted(ex)}); pass --text-field or --prompt-field")
            text = ex[cfg.text_field]
            if not text or not str(text).strip():
                continue
            ids, roles = encode_text(tok, str(text))
            for a in range(0, len(ids), cfg.ctx_len):
                yield doc_id, ids[a: a + cfg.ctx_len], roles[a: a + cfg.ctx_len]
    if n_docs == 0:
        raise SaediffError(f"dataset {cfg.dataset} yielded no documents")
