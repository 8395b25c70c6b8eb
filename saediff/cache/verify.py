"""The content half of `verify_cache` (`saediff cache verify`): checksums, index ranges,
vocabulary and finite activations, read block by block."""
from __future__ import annotations

from typing import Any

import numpy as np

from saediff.errors import SaediffError

# `c` below is an open `saediff.cache.format.CacheFile` (not imported: format imports us)
CacheFile = Any


def content_problems(c: CacheFile, chunk_rows: int) -> list[str]:
    """Every problem of the committed rows' contents (a checksum failure names its block)."""
    problems: list[str] = []
    f = c._f
    vocab = c.attrs.get("vocab_size")  # absent in caches written before it was recorded
    offs = f["seq_offsets"][: c.n_sequences + 1]
    for a in range(0, c.rows, chunk_rows):
        b = min(c.rows, a + chunk_rows)
        try:
            problems += _block_problems(c, a, b, offs, vocab)
        except SaediffError as exc:  # a checksum failure: report it, go on with the next block
            problems.append(str(exc).split("; rebuild")[0])
    return problems


def _block_problems(c: CacheFile, a: int, b: int, offs: np.ndarray,
                    vocab: int | None) -> list[str]:
    problems: list[str] = []
    seq = c.sequence_ids(a, b)
    if np.any(np.diff(seq) < 0) or np.any(seq < 0) or np.any(seq >= c.n_sequences):
        problems.append(f"sequence ids out of order or range within rows [{a}, {b})")
        return problems
    expect = np.arange(a, b) - offs[seq]
    if np.any(c.positions(a, b) != expect):
        problems.append(f"positions disagree with sequence offsets in rows [{a}, {b})")
    r = c.roles(a, b)
    if np.any((r < 0) | (r > 3)):
        problems.append(f"invalid role codes in rows [{a}, {b})")
    t = c.tokens(a, b)
    if np.any(t < 0) or (vocab is not None and np.any(t >= vocab)):
        i = a + int(np.argmax((t < 0) | (t >= (vocab if vocab is not None else np.inf))))
        problems.append(f"token id {int(t[i - a])} at row {i} is outside the vocabulary "
                        f"[0, {vocab if vocab is not None else '?'})")
    for name in c.activation_datasets():
        x = c._read(name, a, b)
        bad = ~np.isfinite(x).all(axis=1)
        if bad.any():
            i = a + int(np.argmax(bad))
            src = name.split("/", 1)[1]
            problems.append(f"non-finite activations in source {src!r} at row {i}")
    return problems
