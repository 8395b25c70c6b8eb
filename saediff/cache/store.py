"""Shuffled training batches out of one or more activation caches (what the SAE trainer eats).

Each (cache, source) is a stream: per epoch the committed rows are cut into contiguous
blocks, the blocks are permuted, and groups of blocks fill a bounded shuffle buffer that is
permuted again and served in order. Every permutation is a pure function of (seed, stream,
epoch, group), so a stream's position is three integers and resuming is exact. Batches mix
the streams in fixed proportions. Memory per stream is one buffer (`buffer_rows` x d_model).
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from saediff.cache.format import CacheFile, open_cache
from saediff.errors import SaediffError
from saediff.models import ROLE_SPECIAL, ROLES, role_codes


def split_rows(cache: CacheFile, eval_fraction: float) -> tuple[tuple[int, int], tuple[int, int]]:
    """(train rows, eval rows): the last `eval_fraction` of *sequences* is held out, whole."""
    if not 0.0 <= eval_fraction < 1.0:
        raise SaediffError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    n_eval = math.ceil(cache.n_sequences * eval_fraction) if eval_fraction > 0 else 0
    if eval_fraction > 0 and n_eval >= cache.n_sequences:
        raise SaediffError(f"{cache.path}: {cache.n_sequences} sequences are too few to hold "
                           f"out {eval_fraction:.0%}")
    cut = int(cache.sequence_offsets(cache.n_sequences - n_eval, cache.n_sequences - n_eval)[0]) \
        if n_eval else cache.rows
    return (0, cut), (cut, cache.rows)


class _Stream:
    """One (cache, source) as an endless, resumable sequence of shuffled rows."""

    def __init__(self, cache: CacheFile, source: str, roles: list[int], rows: tuple[int, int],
                 block_rows: int, buffer_rows: int, seed: int, stream_id: int):
        if source not in cache.sources:
            raise SaediffError(f"source {source!r} not in {cache.path} (sources: {cache.sources})")
        lo, hi = rows
        if hi <= lo:
            raise SaediffError(f"{cache.path}: no rows in range [{lo}, {hi}) for {source!r}")
        self.cache, self.source, self.roles = cache, source, np.array(roles, dtype=np.int8)
        self.blocks = [(a, min(hi, a + block_rows)) for a in range(lo, hi, block_rows)]
        self.group_blocks = max(1, buffer_rows // block_rows)
        self.n_groups = math.ceil(len(self.blocks) / self.group_blocks)
        self.seed, self.stream_id = seed, stream_id
        self.epoch = self.group = self.offset = 0
        self._buf: torch.Tensor | None = None
        self._check_nonempty()

    def _check_nonempty(self) -> None:
        for a, b in self.blocks:
            if np.isin(self.cache.roles(a, b), self.roles).any():
                return
        names = [k for k, v in ROLES.items() if v in self.roles.tolist()]
        raise SaediffError(f"{self.cache.path}: source {self.source!r} has no rows with role(s) "
                           f"{names} in the selected split")

    def _rng(self, *key: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.stream_id, *key])

    def _load(self) -> torch.Tensor:
        order = self._rng(self.epoch).permutation(len(self.blocks))
        chosen = order[self.group * self.group_blocks: (self.group + 1) * self.group_blocks]
        parts = []
        for i in sorted(chosen):  # read in file order; the shuffle below mixes them
            a, b = self.blocks[i]
            x = self.cache.raw_activations(self.source, a, b)
            keep = np.isin(self.cache.roles(a, b), self.roles)
            parts.append(x[keep] if not keep.all() else x)
        rows = np.concatenate(parts) if parts else np.zeros((0, self.cache.d_model), np.float32)
        perm = self._rng(self.epoch, self.group, 1).permutation(len(rows))
        return torch.from_numpy(rows[perm].astype(np.float32, copy=False))

    def _advance_group(self) -> None:
        self.group += 1
        self.offset = 0
        if self.group >= self.n_groups:
            self.group, self.epoch = 0, self.epoch + 1
        self._buf = None

    def take(self, n: int) -> torch.Tensor:
        out: list[torch.Tensor] = []
        while n > 0:
            if self._buf is None:
                self._buf = self._load()
            if self.offset >= len(self._buf):
                self._advance_group()
                continue
            part = self._buf[self.offset: self.offset + n]
            out.append(part)
            self.offset += len(part)
            n -= len(part)
        return torch.cat(out) if len(out) > 1 else out[0]

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "group": self.group, "offset": self.offset}

    def restore(self, state: dict[str, int]) -> None:
        self.epoch, self.group, self.offset = state["epoch"], state["group"], state["offset"]
        self._buf = None


class ActivationStore:
    """Endless iterator of shuffled float32 batches [batch_size, d_model] from caches.

    `sources` maps source names to mixing weights (e.g. {"base": 0.5, "finetuned": 0.5});
    a list means equal weights, None all sources of the first cache. `roles` (names) filters
    rows; None keeps every role but `special` (BOS, pad, template scaffolding). `split`
    selects the training rows, the held-out rows (`eval`, the last `eval_fraction` of
    sequences) or all rows. Deterministic for a seed; `state_dict()` resumes exactly.
    """

    def __init__(self, caches: str | Path | CacheFile | list[str | Path | CacheFile],
                 sources: dict[str, float] | list[str] | None = None,
                 roles: list[str] | None = None, batch_size: int = 4096, seed: int = 0,
                 buffer_rows: int = 1 << 18, block_rows: int = 4096, split: str = "train",
                 eval_fraction: float = 0.0, device: str | torch.device = "cpu",
                 allow_partial: bool = False):
        paths = caches if isinstance(caches, list) else [caches]
        if not paths:
            raise SaediffError("ActivationStore needs at least one cache")
        self.caches = [c if isinstance(c, CacheFile) else open_cache(c, allow_partial)
                       for c in paths]
        d = {c.d_model for c in self.caches}
        if len(d) > 1:
            raise SaediffError(f"caches have different d_model {sorted(d)}")
        self.d_model = d.pop()
        if sources is None:
            sources = self.caches[0].sources
        if isinstance(sources, (list, tuple)):
            sources = {s: 1.0 for s in sources}
        if not sources or any(w < 0 for w in sources.values()) or sum(sources.values()) <= 0:
            raise SaediffError(f"source weights must be non-negative and not all zero: {sources}")
        if split not in ("train", "eval", "all"):
            raise SaediffError(f"split must be train, eval or all, got {split!r}")
        codes = role_codes(roles) if roles else [v for v in ROLES.values() if v != ROLE_SPECIAL]
        self.batch_size, self.device = batch_size, torch.device(device)
        self.streams: list[_Stream] = []
        weights: list[float] = []
        for name, w in sources.items():
            holders = [c for c in self.caches if name in c.sources]
            if not holders:
                raise SaediffError(f"source {name!r} is in none of the caches "
                                   f"({[str(c.path) for c in self.caches]}: "
                                   f"{[c.sources for c in self.caches]})")
            for c in holders:
                train, held = split_rows(c, eval_fraction)
                rows = {"train": train, "eval": held, "all": (0, c.rows)}[split]
                self.streams.append(_Stream(c, name, codes, rows, block_rows, buffer_rows, seed,
                                            stream_id=len(self.streams)))
                weights.append(w / len(holders))
        total = sum(weights)
        self.weights = [w / total for w in weights]
        self.counts = self._allocate(batch_size)
        self.batches = 0

    def _allocate(self, n: int) -> list[int]:
        """Rows per stream in each batch: largest-remainder rounding of n * weight."""
        raw = [n * w for w in self.weights]
        counts = [int(math.floor(r)) for r in raw]
        for i in sorted(range(len(raw)), key=lambda i: counts[i] - raw[i])[: n - sum(counts)]:
            counts[i] += 1
        return counts

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def __next__(self) -> torch.Tensor:
        parts = [s.take(k) for s, k in zip(self.streams, self.counts) if k > 0]
        self.batches += 1
        batch = torch.cat(parts) if len(parts) > 1 else parts[0]
        return batch.to(self.device, non_blocking=True)

    def state_dict(self) -> dict[str, Any]:
        return {"batches": self.batches, "streams": [s.state() for s in self.streams]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["streams"]) != len(self.streams):
            raise SaediffError("store state does not match these caches/sources")
        for s, st in zip(self.streams, state["streams"]):
            s.restore(st)
        self.batches = int(state["batches"])

    def close(self) -> None:
        for c in self.caches:
            c.close()


class PairedStore:
    """Endless shuffled batches of the *same* tokens seen by two sources of the caches.

    Two `_Stream`s with the same seed and stream id visit the same rows in the same order
    (their permutations depend only on (seed, stream, epoch, group) and the shared role
    column), so row i of the base batch and of the fine-tuned batch are one token.
    `mode="pair"` yields [B, 2, d] (base, fine-tuned); `mode="diff"` yields [B, d] =
    fine-tuned − base (what a difference SAE trains on). Resumable like `ActivationStore`.
    """

    def __init__(self, caches: str | Path | CacheFile | list[str | Path | CacheFile],
                 sources: tuple[str, str] = ("base", "finetuned"), mode: str = "pair",
                 roles: list[str] | None = None, batch_size: int = 4096, seed: int = 0,
                 buffer_rows: int = 1 << 18, block_rows: int = 4096, split: str = "train",
                 eval_fraction: float = 0.0, device: str | torch.device = "cpu",
                 allow_partial: bool = False):
        if mode not in ("pair", "diff"):
            raise SaediffError(f"PairedStore mode must be 'pair' or 'diff', got {mode!r}")
        if split not in ("train", "eval", "all"):
            raise SaediffError(f"split must be train, eval or all, got {split!r}")
        paths = caches if isinstance(caches, list) else [caches]
        self.caches = [c if isinstance(c, CacheFile) else open_cache(c, allow_partial)
                       for c in paths]
        self.d_model = self.caches[0].d_model
        self.layer, self.hook_name = self.caches[0].layer, self.caches[0].hook_name
        codes = role_codes(roles) if roles else [v for v in ROLES.values() if v != ROLE_SPECIAL]
        self.mode, self.batch_size, self.device = mode, batch_size, torch.device(device)
        self.pairs: list[tuple[_Stream, _Stream]] = []
        sizes = []
        for i, c in enumerate(self.caches):
            missing = [s for s in sources if s not in c.sources]
            if missing:
                raise SaediffError(f"{c.path} lacks source(s) {missing} (has {c.sources}); "
                                   "a paired method needs a cache of both models "
                                   "(`saediff cache --finetuned ...`)")
            train, held = split_rows(c, eval_fraction)
            rows = {"train": train, "eval": held, "all": (0, c.rows)}[split]
            self.pairs.append(tuple(_Stream(c, s, codes, rows, block_rows, buffer_rows, seed,
                                            stream_id=i) for s in sources))  # type: ignore
            sizes.append(rows[1] - rows[0])
        total = sum(sizes)
        self.counts = [batch_size * s // total for s in sizes]
        self.counts[0] += batch_size - sum(self.counts)
        self.batches = 0

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def __next__(self) -> torch.Tensor:
        parts = []
        for (sb, sf), k in zip(self.pairs, self.counts):
            if k > 0:
                xb, xf = sb.take(k), sf.take(k)
                parts.append(xf - xb if self.mode == "diff" else torch.stack([xb, xf], 1))
        self.batches += 1
        batch = torch.cat(parts) if len(parts) > 1 else parts[0]
        return batch.to(self.device, non_blocking=True)

    def state_dict(self) -> dict[str, Any]:
        return {"batches": self.batches,
                "streams": [s.state() for pair in self.pairs for s in pair]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        streams = [s for pair in self.pairs for s in pair]
        if len(state["streams"]) != len(streams):
            raise SaediffError("store state does not match these caches/sources")
        for s, st in zip(streams, state["streams"]):
            s.restore(st)
        self.batches = int(state["batches"])

    def close(self) -> None:
        for c in self.caches:
            c.close()
