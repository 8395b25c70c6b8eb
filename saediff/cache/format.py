"""The on-disk activation cache format (HDF5) and its reader.

Layout (schema 1). Row i is one real (non-pad) token of one model input; the same row index
means the same token for every source, because all sources saw the same token ids.

    /tokens       int32 [N]         token id
    /seq_ids      int64 [N]         which model input (sequence) the row came from
    /doc_ids      int64 [N]         which dataset document that sequence came from
    /positions    int32 [N]         position of the token inside its sequence
    /roles        int8  [N]         0 special, 1 prompt, 2 response, 3 text (models.ROLES)
    /seq_offsets  int64 [S+1]       first row of each sequence (S = committed sequences)
    /acts/<src>   f16|f32|u16 [N, d] residual stream after block `layer` for source <src>
                                     (u16: raw bfloat16 words, attribute saediff_dtype=bfloat16)
    /acts/<src>.layer<L>            (a multi-layer cache, attr `layers`: one per layer L
                                    instead; the index datasets and the commit are shared)
    /progress     int64 [4]         committed rows, committed sequences, complete flag, max_tokens

Only `progress` is trusted: a killed writer may leave datasets longer than the committed
prefix, and those rows are never served; of a partial, only the prefix `readable_prefix`
finds is served (a kill can tear the chunk the writer was rewriting). A cache is written as
`NAME.h5.partial` and renamed to `NAME.h5` once complete, so a file under its final name is
always whole.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from saediff.cache.verify import content_problems
from saediff.errors import SaediffError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
INDEX_FIELDS = {"tokens": "i4", "seq_ids": "i8", "doc_ids": "i8", "positions": "i4", "roles": "i1"}
JSON_ATTRS = ("models", "sources", "dataset", "layers", "hook_names")
PARTIAL_SUFFIX = ".partial"
P_ROWS, P_SEQS, P_COMPLETE, P_MAX = range(4)


# Storage of activations per `dtype` attribute. HDF5 has no bfloat16: its raw 16-bit words are
# stored as uint16 (the dataset carries saediff_dtype=bfloat16) and decoded on every read.
STORED_DTYPES = {"float16": np.dtype("f2"), "float32": np.dtype("f4"), "bfloat16": np.dtype("u2")}


def encode_activations(x32: np.ndarray, dtype: str) -> np.ndarray:
    """float32 rows -> their stored form (`decode_activations` inverts it up to rounding).

    A value beyond the dtype's range becomes inf (no numpy warning): callers check finiteness.
    """
    if dtype == "bfloat16":  # round to nearest even, as torch does
        words = torch.from_numpy(np.ascontiguousarray(x32, np.float32)).to(torch.bfloat16)
        return words.view(torch.int16).numpy().view(np.uint16)
    with np.errstate(over="ignore"):
        return x32.astype(STORED_DTYPES[dtype])


def decode_activations(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Stored rows -> float32 (bfloat16 words widened exactly; float16/32 as numpy casts)."""
    if dtype == "bfloat16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32, copy=False)


def partial_path(path: str | Path) -> Path:
    return Path(str(path) + PARTIAL_SUFFIX)


def acts_dataset(source: str, layer: int | None = None) -> str:
    """Name of a source's activations: `acts/base` (one layer), `acts/base.layer12` (several)."""
    return f"acts/{source}" if layer is None else f"acts/{source}.layer{layer}"


def cache_layers(attrs: dict[str, Any]) -> list[int]:
    """The layers a cache holds (a single-layer cache: [its layer])."""
    if attrs.get("layers"):
        return [int(x) for x in attrs["layers"]]
    return [int(attrs["layer"])]


def read_attrs(f: h5py.File) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in f.attrs.items():
        if isinstance(v, bytes):
            v = v.decode()
        if k in JSON_ATTRS:
            v = json.loads(v)
        elif isinstance(v, np.generic):
            v = v.item()
        out[k] = v
    return out


class CacheFile:
    """Read access to a cache: committed rows only, activations as float32 tensors."""

    def __init__(self, path: str | Path, allow_partial: bool = False, layer: int | None = None):
        path = Path(path)
        if not path.exists() and partial_path(path).exists():
            if not allow_partial:
                raise SaediffError(f"{path} is not complete (only {partial_path(path)} exists); "
                                   "rerun `saediff cache` to finish it, or pass --allow-partial "
                                   "to use its committed prefix")
            log.warning("%s is not complete; reading the committed prefix of %s",
                        path, partial_path(path))
            path = partial_path(path)
        if not path.exists():
            raise FileNotFoundError(f"activation cache not found: {path}")
        self.path = path
        try:
            self._f = h5py.File(path, "r")
        except OSError as exc:
            raise SaediffError(f"cannot open {path} as an HDF5 cache: {exc}") from exc
        if "progress" not in self._f or self._f.attrs.get("schema_version") is None:
            self._f.close()
            raise SaediffError(f"{path} is not a saediff activation cache (no progress/schema)")
        self.attrs = read_attrs(self._f)
        if self.attrs["schema_version"] != SCHEMA_VERSION:
            raise SaediffError(f"{path}: schema version {self.attrs['schema_version']}, "
                               f"this saediff reads {SCHEMA_VERSION}")
        self._select_layer(layer)
        prog = self._f["progress"][:]
        self.rows = int(prog[P_ROWS])
        self.n_sequences = int(prog[P_SEQS])
        self.complete = bool(prog[P_COMPLETE])
        if not self.complete and allow_partial:  # (without allow_partial it is refused below)
            try:
                rows, seqs = readable_prefix(self._f)
            except OSError as exc:
                self._f.close()
                raise SaediffError(f"{path} (an interrupted cache) is damaged: {exc}; rerun "
                                   "`saediff cache ... --overwrite`") from exc
            if rows < self.rows:
                log.warning("%s: serving the first %d of %d committed rows (a chunk after them "
                            "was torn by the interruption)", path, rows, self.rows)
            self.rows, self.n_sequences = rows, seqs
        if not allow_partial:
            if not self.complete:
                self._f.close()
                raise SaediffError(f"{path} is an incomplete cache (interrupted writer); rerun "
                                   "`saediff cache` to finish it, or pass --allow-partial")
            problems = structure_problems(self)
            if problems:
                self._f.close()
                raise SaediffError(f"{path} is damaged: {problems[0]}; check it with `saediff "
                                   "cache verify` and rebuild it with --overwrite")

    def _select_layer(self, layer: int | None) -> None:
        """Which layer's activations this reader serves (a multi-layer cache holds several)."""
        self.layers = cache_layers(self.attrs)
        self.multi_layer = bool(self.attrs.get("layers"))
        if layer is not None and layer not in self.layers:
            self._f.close()
            raise SaediffError(f"{self.path} holds layer(s) {self.layers}, not {layer}; pass "
                               "one of those (or cache that layer)")
        self._layer = layer if layer is not None else \
            (self.layers[0] if not self.multi_layer else None)

    def _acts(self, source: str) -> str:
        if not self.multi_layer:
            return acts_dataset(source)
        if self._layer is None:
            raise SaediffError(f"{self.path} holds layers {self.layers}; open it at one of them "
                               "(open_cache(path, layer=L); CLI: --layer L or --layers)")
        return acts_dataset(source, self._layer)

    def activation_datasets(self) -> list[str]:
        """Every stored activation dataset (all sources, all layers)."""
        layers = self.layers if self.multi_layer else [None]
        return [acts_dataset(s, x) for x in layers for s in self.sources]

    # -- metadata -------------------------------------------------------------------------
    @property
    def d_model(self) -> int:
        return int(self.attrs["d_model"])

    @property
    def layer(self) -> int:
        self._acts(self.sources[0])  # a multi-layer cache opened without a layer: say so
        return int(self._layer)  # type: ignore[arg-type]

    @property
    def sources(self) -> list[str]:
        return list(self.attrs["sources"])

    @property
    def hook_name(self) -> str:
        return f"blocks.{self.layer}.hook_resid_post" if self.multi_layer \
            else str(self.attrs["hook_name"])

    def _span(self, start: int, stop: int | None) -> tuple[int, int]:
        stop = self.rows if stop is None else stop
        if not 0 <= start <= stop <= self.rows:
            raise IndexError(f"rows [{start}, {stop}) outside the {self.rows} committed rows "
                             f"of {self.path}")
        return start, stop

    def _read(self, name: str, a: int, b: int) -> np.ndarray:
        try:
            return self._f[name][a:b]
        except OSError as exc:  # Fletcher-32 mismatch or an unreadable block
            raise SaediffError(f"{self.path}: rows [{a}, {b}) of /{name} are corrupt ({exc}); "
                               "rebuild the cache with `saediff cache ... --overwrite`") from exc

    def _index(self, name: str, start: int, stop: int | None) -> np.ndarray:
        a, b = self._span(start, stop)
        return self._read(name, a, b)

    def tokens(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        return self._index("tokens", start, stop)

    def roles(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        return self._index("roles", start, stop)

    def sequence_ids(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        return self._index("seq_ids", start, stop)

    def doc_ids(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        return self._index("doc_ids", start, stop)

    def positions(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        return self._index("positions", start, stop)

    def activations(self, source: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """float32 [stop-start, d_model] for one source."""
        if source not in self.sources:
            raise SaediffError(f"source {source!r} not in {self.path} (sources: {self.sources})")
        return torch.from_numpy(self.raw_activations(source, start, stop)
                                .astype(np.float32, copy=False))

    def raw_activations(self, source: str, start: int, stop: int | None = None) -> np.ndarray:
        """Stored float dtype without conversion (bfloat16 words come back as float32)."""
        a, b = self._span(start, stop)
        raw = self._read(self._acts(source), a, b)
        return decode_activations(raw, "bfloat16") if self.dtype == "bfloat16" else raw

    @property
    def dtype(self) -> str:
        """Storage dtype of the activations: float16, bfloat16 or float32."""
        return str(self.attrs.get("dtype", "float32"))

    def sequence_offsets(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """First row of sequences start..stop (stop inclusive of the end offset)."""
        stop = self.n_sequences if stop is None else stop
        return self._read("seq_offsets", start, stop + 1)

    def sequences(self, start: int = 0, stop: int | None = None) -> list[dict[str, Any]]:
        """The exact model inputs of sequences [start, stop): ids, roles, first row, doc id."""
        offs = self.sequence_offsets(start, stop)
        if len(offs) < 2:
            return []
        lo, hi = int(offs[0]), int(offs[-1])
        toks, roles, docs = self.tokens(lo, hi), self.roles(lo, hi), self.doc_ids(lo, hi)
        out = []
        for i, (a, b) in enumerate(zip(offs[:-1], offs[1:])):
            a, b = int(a) - lo, int(b) - lo
            out.append({"seq_id": start + i, "row": a + lo, "doc_id": int(docs[a]),
                        "ids": toks[a:b].tolist(), "roles": roles[a:b].tolist()})
        return out

    def info(self) -> dict[str, Any]:
        roles = np.bincount(self.roles(0, self.rows).astype(np.int64), minlength=4) \
            if self.rows else np.zeros(4, dtype=np.int64)
        from saediff.models import ROLE_NAMES

        return {"path": str(self.path), "rows": self.rows, "sequences": self.n_sequences,
                "complete": self.complete, "d_model": self.d_model,
                "layer": self._layer, "layers": self.layers, "sources": self.sources,
                "role_counts": {ROLE_NAMES[i]: int(c) for i, c in enumerate(roles)},
                "world_size": 1,  # ranks that wrote it (a torchrun cache says more below)
                **{k: v for k, v in self.attrs.items() if k not in ("sources", "layers")}}

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> CacheFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def open_cache(path: str | Path, allow_partial: bool = False,
               layer: int | None = None) -> CacheFile:
    """Open a complete, structurally sound activation cache for reading.

    `allow_partial` also opens an incomplete one (`NAME.h5.partial`: its committed prefix)
    and skips the structure check (for `cache info` / `cache verify`). `layer` picks the
    layer of a multi-layer cache (`saediff cache --layers`); a single-layer cache has one.
    """
    return CacheFile(path, allow_partial=allow_partial, layer=layer)


def _first_bad_chunk(d: h5py.Dataset, n: int) -> int:
    """Start of the first chunk of d[:n] that was never written or fails its checksum, else n.

    Only the tail can be torn or missing (a full chunk is never rewritten), so chunks are
    checked backwards from the last one until one is stored and passes its checksum.
    """
    if n == 0 or d.chunks is None:
        return n
    step = d.chunks[0]
    zeros = (0,) * (d.ndim - 1)
    limit = n
    for a in range((n - 1) // step * step, -1, -step):
        # a never-written chunk would read as zeros without an error: check it is stored
        if d.id.get_chunk_info_by_coord((a,) + zeros).byte_offset is not None:
            try:
                d[a:min(a + step, n)]
                break
            except OSError:
                pass
        limit = a
    return limit


def readable_prefix(f: h5py.File) -> tuple[int, int]:
    """(rows, sequences) of an interrupted cache that can be served and resumed from.

    The writer appends rows to the chunk that holds the commit point by rewriting that chunk
    in place. A SIGKILL in the middle of that write leaves the committed bytes unchanged but the
    chunk's Fletcher-32 checksum wrong, which cannot be told apart from damage. So the prefix
    stops before the first torn or unwritten chunk of any dataset, at a sequence boundary;
    a resume recomputes the rest.
    """
    rows, seqs = int(f["progress"][P_ROWS]), int(f["progress"][P_SEQS])
    names = list(INDEX_FIELDS) + [f"acts/{s}" for s in f["acts"]]
    limit = min([rows] + [_first_bad_chunk(f[n], min(rows, f[n].shape[0])) for n in names])
    so = f["seq_offsets"]
    s = min(seqs, _first_bad_chunk(so, min(seqs + 1, so.shape[0])) - 1)
    step = so.chunks[0] if so.chunks else max(s + 1, 1)
    while s > 0:  # the last sequence boundary at or before `limit`
        lo = s // step * step
        offs = so[lo:s + 1]
        i = int(np.searchsorted(offs, limit, side="right")) - 1
        if i >= 0:
            return int(offs[i]), lo + i
        s = lo - 1
    return 0, 0


def structure_problems(c: CacheFile) -> list[str]:
    """Cheap checks (no activation reads): datasets present and long enough, offsets tile."""
    f = c._f
    problems: list[str] = []
    for name in list(INDEX_FIELDS) + ["seq_offsets"]:
        if name not in f:
            problems.append(f"missing dataset /{name}")
    for name in c.activation_datasets():
        if name not in f:
            problems.append(f"missing activations /{name}")
    if problems:
        return problems
    for name in INDEX_FIELDS:
        if f[name].shape[0] < c.rows:
            problems.append(f"/{name} has {f[name].shape[0]} rows < committed {c.rows}")
    for name in c.activation_datasets():
        shape = f[name].shape
        if shape[0] < c.rows or shape[1] != c.d_model:
            problems.append(f"/{name} shape {shape} does not fit {c.rows}x{c.d_model}")
    try:
        offs = f["seq_offsets"][: c.n_sequences + 1]
    except OSError as exc:
        return problems + [f"/seq_offsets is corrupt ({exc})"]
    if len(offs) != c.n_sequences + 1 or offs[0] != 0 or offs[-1] != c.rows \
            or np.any(np.diff(offs) <= 0):
        problems.append("sequence offsets do not tile the committed rows")
    return problems


def verify_cache(path: str | Path, chunk_rows: int = 65536) -> list[str]:
    """Check a cache end to end (checksums, index ranges, finiteness); returns the problems."""
    with open_cache(path, allow_partial=True) as c:
        problems = structure_problems(c)
        if not problems:
            problems = content_problems(c, chunk_rows)
    return problems
