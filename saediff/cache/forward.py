"""One forward pass per batch and model: the rows of every cached layer, checked finite.

With several layers (`saediff cache --layers`) each model runs once per batch, cut after the
deepest requested block (`models.run_to_layers`); a non-finite value names its document and
the token where it entered.
"""
from __future__ import annotations

import numpy as np
import torch

from saediff.cache.format import acts_dataset, decode_activations, encode_activations
from saediff.errors import SaediffError
from saediff.models import LoadedModel, pad_batch, run_to_layer, run_to_layers


def forward_batch(batch: list[tuple[int, list[int], list[int]]], models: dict[str, LoadedModel],
                   layers: list[int], pad_id: int, dtype: str) -> dict[str, np.ndarray]:
    """{activation dataset name: rows} of one batch: one forward pass per model, every layer."""
    ids, mask = pad_batch([b[1] for b in batch], pad_id)
    acts = {}
    for src, lm in models.items():
        if len(layers) == 1:
            hs = {layers[0]: run_to_layer(lm, ids, mask, layers[0])}
            names = {layers[0]: acts_dataset(src)}
        else:
            hs = run_to_layers(lm, ids, mask, layers)
            names = {x: acts_dataset(src, x) for x in layers}
        for layer, h in hs.items():
            acts[names[layer]] = _checked_rows(h[mask.bool()], batch, src, lm, layer, dtype)
    return acts


def _checked_rows(h: torch.Tensor, batch: list[tuple[int, list[int], list[int]]], src: str,
                  lm: LoadedModel, layer: int, dtype: str) -> np.ndarray:
    """One layer's rows in the storage dtype (`format.STORED_DTYPES`: bfloat16 as raw words);
    a non-finite value names its token."""
    lens = [len(b[1]) for b in batch]
    x32 = h.float().cpu().numpy()
    x = encode_activations(x32, dtype)
    x_check = decode_activations(x, dtype) if dtype == "bfloat16" else x  # words: decode
    for arr, what in ((x32, "NaN/inf"), (x_check, f"values beyond {dtype} range "
                                                    "(use --dtype bfloat16 or float32)")):
        bad = ~np.isfinite(arr).all(axis=1)
        if bad.any():  # name the first bad token: document and position in its input
            i = int(np.argmax(bad))
            s = int(np.searchsorted(np.cumsum(lens), i, side="right"))
            pos = _first_bad_position(lm, batch[s][1], layer) \
                if arr is x32 else i - sum(lens[:s])
            raise SaediffError(f"non-finite activations from {src} ({lm.name}): {what} at "
                               f"document {batch[s][0]}, position {pos}")
    return x


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
