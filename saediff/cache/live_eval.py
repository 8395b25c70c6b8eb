"""Held-out documents of a live run, in RAM and readable like a `CacheFile` by the evals.

A live run never writes activations to disk, so its evals (FVU, L0, dead, spliced loss) read
this instead: the model(s) run once on the held-out documents (`live.is_eval_document`), up to
`max_rows` rows of the trained roles and at least `max_sequences` whole sequences.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from saediff.cache.live import ModelRows
from saediff.models import ROLES


class MemoryCache:
    """Tokens, roles, sequence offsets and float32 activations of held-out sequences."""

    held_out = True  # every row is held out (the evals take no split of it)

    def __init__(self, rows: ModelRows, models: dict[str, Any], codes: list[int],
                 max_rows: int, max_sequences: int):
        self.path = f"live:{rows.src.dataset}"
        self.layer, self.d_model = rows.layers[0], rows.d_model
        self.hook_name = f"blocks.{self.layer}.hook_resid_post"
        self.sources = list(rows.names)
        self.attrs = {"models": {k: m.provenance() for k, m in models.items()}}
        toks, roles, acts, seqs = [], [], [], []
        kept = 0
        batch: list[Any] = []
        stream = rows.sequences()
        while kept < max_rows or len(seqs) < max_sequences:
            item = next(stream, None)
            if item is not None:
                batch.append(item)
            if batch and (item is None or len(batch) == rows.lm_batch_size):
                for (doc, ids, rl), x in zip(batch, rows.forward(batch)):
                    toks.append(np.asarray(ids, np.int32))
                    roles.append(np.asarray(rl, np.int8))
                    acts.append(x[:, 0].float().cpu())  # [T, S, d] of layer 0
                    seqs.append(doc)
                    kept += int(np.isin(rl, codes).sum())
                batch = []
            if item is None:
                break
        self._tokens = np.concatenate(toks) if toks else np.zeros(0, np.int32)
        self._roles = np.concatenate(roles) if roles else np.zeros(0, np.int8)
        self._acts = torch.cat(acts) if acts else torch.zeros(0, len(self.sources), self.d_model)
        self._offsets = np.concatenate([[0], np.cumsum([len(t) for t in toks])]).astype(np.int64)
        self._docs = seqs
        self.rows, self.n_sequences = len(self._tokens), len(seqs)

    def roles(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        return self._roles[start:stop]

    def activations(self, source: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        return self._acts[start:stop, self.sources.index(source)]

    def sequences(self, start: int = 0, stop: int | None = None) -> list[dict[str, Any]]:
        stop = self.n_sequences if stop is None else stop
        out = []
        for i in range(start, stop):
            a, b = int(self._offsets[i]), int(self._offsets[i + 1])
            out.append({"seq_id": i, "row": a, "doc_id": self._docs[i],
                        "ids": self._tokens[a:b].tolist(), "roles": self._roles[a:b].tolist()})
        return out

    def paired_batches(self, codes: list[int], batch_size: int, n: int) -> list[torch.Tensor]:
        """Up to n [B, 2, d] (base, fine-tuned) batches of the trained roles (crosscoder evals)."""
        keep = torch.from_numpy(np.isin(self._roles, codes))
        x = self._acts[keep][:, :2]
        return [b for b in x.split(batch_size)[:n] if len(b)]

    def close(self) -> None:
        pass


ALL_ROLES = sorted(ROLES.values())
