"""A cache's provenance (its HDF5 attributes): written at creation, compared before a cache is
resumed or reused, so a rerun with other models, data or layers never mixes two runs."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import h5py

import saediff
from saediff.cache.documents import dataset_spec
from saediff.cache.format import SCHEMA_VERSION, read_attrs
from saediff.errors import SaediffError
from saediff.models import LoadedModel, tokenizer_fingerprint

# `cfg` below is a `saediff.cache.writer.CacheConfig` (not imported: the writer imports us)
CacheConfig = Any


def provenance(cfg: CacheConfig, models: dict[str, LoadedModel]) -> dict[str, Any]:
    """The attributes a cache file carries: what was cached, from which models and data."""
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


def provenance_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The compared fields where two provenances differ (a resume or reuse needs none)."""
    a, b = _comparable(old), _comparable(new)
    return [k for k in _COMPARED if a[k] != b[k]]


def existing_diff(out: Path, prov: dict[str, Any], overwrite: bool) -> list[str]:
    """Provenance fields where the cache at `out` differs; a file there that is no HDF5 cache
    is refused (or, with --overwrite, replaced like any other)."""
    try:
        with h5py.File(out, "r") as f:
            return provenance_diff(read_attrs(f), prov)
    except OSError as exc:
        if overwrite:
            return ["not an HDF5 cache"]
        raise SaediffError(f"--out {out} exists and is not an HDF5 cache ({exc.__class__.__name__}"
                           "); choose another --out, or pass --overwrite to replace it") from exc
