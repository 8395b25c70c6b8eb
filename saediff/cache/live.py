"""Activations straight from the model(s), for training without a cache on disk.

`ModelRows` runs the model(s) on the document stream (`iter_sequences`: the very sequences
`saediff cache` writes) in batches of sequences, stops every forward after the deepest
requested block (several layers come from one pass), keeps the rows of the trained roles and
skips held-out documents. `LiveStore` turns that row stream into shuffled batches through a
bounded mixing buffer and is resumable from a few integers:

The stream is cut into chunks of H = 2C/3 rows (C = `buffer_rows`). Generation g permutes
chunk g (seeded by (seed, g)); its first half joins the second half kept back from chunk g-1
and the union, permuted again, is served. So at most C rows are resident, a batch mixes rows
from a window of two chunks, every row is served exactly once per pass over the data, and
generation g depends only on chunks g-1 and g: a checkpoint records where chunk g-1 starts
in the documents (epoch, sequence, row) and a resume recomputes those two chunks (at most
4C/3 rows of forward passes) instead of storing the buffer. An epoch ends where the documents
do; the next one reads them again (chunk boundaries, and so the mixing, differ).
"""
from __future__ import annotations

import itertools
import json
import logging
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from saediff.cache.documents import iter_sequences
from saediff.errors import SaediffError
from saediff.models import LoadedModel, pad_batch, run_to_layers

log = logging.getLogger(__name__)

MODES = ("activations", "pair", "diff")
BUFFER_BUDGET_BYTES = 1 << 30
"""Default mixing-buffer size: as many rows as fit 1 GiB in the buffer's dtype."""
_PHI64 = 0x9E3779B97F4A7C15  # 2^64 / golden ratio


def is_eval_document(doc_id: int, eval_fraction: float) -> bool:
    """Held out of live training: frac((doc_id + 1) / phi) < eval_fraction.

    A Weyl sequence: spread evenly over the stream, a fixed share of any prefix, no state.
    """
    return ((doc_id + 1) * _PHI64) % (1 << 64) < eval_fraction * (1 << 64)


class ModelRows:
    """The endless (epoch, sequence index, rows) stream of one rank's training documents.

    Rows are [n, L, ...] tensors (L = len(layers)): `activations` mode gives one row per
    (token, source) with each source's rows kept with probability weight / max weight, so a
    batch holds the sources in the configured proportions in expectation; `pair` gives
    [n, L, 2, d] (base, fine-tuned of the same token); `diff` gives fine-tuned − base.
    """

    def __init__(self, src: Any, models: dict[str, LoadedModel], layers: list[int],
                 mode: str, weights: dict[str, float], codes: list[int], lm_batch_size: int,
                 eval_fraction: float, seed: int, shard: tuple[int, int] = (0, 1),
                 split: str = "train", dtype: torch.dtype = torch.float32):
        if mode not in MODES:
            raise SaediffError(f"live mode must be one of {MODES}, got {mode!r}")
        if not weights or any(w < 0 for w in weights.values()) or max(weights.values()) <= 0:
            raise SaediffError(f"source weights must be non-negative and not all zero: {weights}")
        self.src, self.models, self.layers, self.mode = src, models, list(layers), mode
        self.names = [s for s, w in weights.items() if w > 0] if mode == "activations" \
            else ["base", "finetuned"]
        missing = [s for s in self.names if s not in models]
        if missing:
            raise SaediffError(f"live source(s) {missing} need a model: pass --finetuned "
                               f"(or --finetuned-adapter); have {sorted(models)}")
        top = max(weights.values()) if mode == "activations" else 1.0
        self.keep = {s: weights[s] / top for s in self.names} if mode == "activations" else {}
        self.codes = torch.tensor(codes)
        self.lm_batch_size, self.eval_fraction, self.seed = lm_batch_size, eval_fraction, seed
        self.shard, self.split, self.dtype = shard, split, dtype
        self.tok = models["base"].tokenizer
        first = models["base"]
        self.d_model = first.d_model
        self.row_shape = (len(self.layers),) + ((2, self.d_model) if mode == "pair"
                                                else (self.d_model,))

    def sequences(self) -> Iterator[tuple[int, list[int], list[int]]]:
        """This split's (doc_id, ids, roles) model inputs in their fixed order."""
        want_eval = self.split == "eval"
        for item in iter_sequences(self.src, self.tok, self.shard):
            if is_eval_document(item[0], self.eval_fraction) == want_eval:
                yield item

    def iterate(self, epoch: int = 0, seq: int = 0) -> Iterator[tuple[int, int, torch.Tensor]]:
        """(epoch, sequence index, kept rows) from sequence `seq` of `epoch` on, forever."""
        for e in itertools.count(epoch):
            n_rows = 0
            for item in self._one_epoch(e, seq if e == epoch else 0):
                n_rows += len(item[2])
                yield item
            if n_rows == 0 and (e > epoch or seq == 0):
                raise SaediffError(f"dataset {self.src.dataset}: no {self.split} rows of the "
                                   "trained roles (check --roles, --eval-fraction and the fields)")

    def _one_epoch(self, epoch: int, start: int) -> Iterator[tuple[int, int, torch.Tensor]]:
        # Forward the same batches of sequences as a pass from 0 does (same padding, same
        # kernels), so a resumed run sees bit-identical rows.
        first = start - start % self.lm_batch_size
        seqs = itertools.islice(self.sequences(), first, None)  # skipping: tokenisation only
        for i0 in itertools.count(first, self.lm_batch_size):
            batch = list(itertools.islice(seqs, self.lm_batch_size))
            if not batch:
                return
            for j, rows in enumerate(self.forward(batch)):
                if i0 + j >= start:
                    yield epoch, i0 + j, self._select(rows, epoch, i0 + j)

    @torch.no_grad()
    def forward(self, batch: list[tuple[int, list[int], list[int]]]) -> list[torch.Tensor]:
        """Per sequence: [n_kept_tokens, L, S, d] activations (S sources) in the buffer dtype."""
        ids, mask = pad_batch([b[1] for b in batch], self.tok.pad_token_id)
        per_src = []
        for name in self.names:
            acts = run_to_layers(self.models[name], ids, mask, self.layers)
            per_src.append(torch.stack([acts[layer] for layer in self.layers], 2))  # B,T,L,d
        x = torch.stack(per_src, 3)  # [B, T, L, S, d]
        roles = torch.full(ids.shape, -1, dtype=torch.long)  # padding: no role
        for j, (_, tokens, rl) in enumerate(batch):
            roles[j, : len(tokens)] = torch.tensor(rl)
        keep = torch.isin(roles, self.codes)
        rows = x[keep.to(x.device)]  # one gather for the whole batch
        if not torch.isfinite(rows).all():
            bad = int(torch.isfinite(rows).flatten(1).all(1).logical_not().nonzero()[0])
            j = int(torch.searchsorted(keep.sum(1).cumsum(0), bad, right=True))
            raise SaediffError(f"non-finite activations at document {batch[j][0]} of the live "
                               "stream; `saediff cache` on it names the token")
        return list(rows.to(self.dtype).split(keep.sum(1).tolist()))

    def _select(self, x: torch.Tensor, epoch: int, seq: int) -> torch.Tensor:
        """[n, L, S, d] -> rows of this mode (deterministic in (seed, epoch, seq))."""
        if self.mode == "pair":
            return x
        if self.mode == "diff":
            return (x[:, :, 1].float() - x[:, :, 0].float()).to(self.dtype)
        parts = []
        rng = np.random.default_rng([self.seed, epoch, seq, 17])
        for s, name in enumerate(self.names):
            if self.keep[name] >= 1:  # the heaviest source keeps every row
                parts.append(x[:, :, s])
                continue
            keep = rng.random(len(x)) < self.keep[name]
            parts.append(x[torch.from_numpy(keep).to(x.device), :, s])
        return torch.cat(parts) if len(parts) > 1 else parts[0]


class LiveStore:
    """Endless shuffled batches from a `ModelRows`-like stream; `state_dict` resumes exactly.

    Serves layer `layers[0]` as [B, d] (or [B, 2, d] in pair mode); `next_layers` gives every
    layer of the same rows. `rank_local`: under torchrun each rank's store serves its own
    share of the global batch (its own documents), so the trainer must not slice it again.
    """

    def __init__(self, rows: Any, batch_size: int, buffer_rows: int, seed: int,
                 rank_local: bool = False):
        if buffer_rows < batch_size:
            raise SaediffError(f"--buffer-tokens {buffer_rows} is smaller than one batch "
                               f"({batch_size} rows); raise it or lower --batch-size")
        self.rows, self.batch_size, self.seed = rows, batch_size, seed
        self.buffer_rows, self.rank_local = buffer_rows, rank_local
        self.chunk = max(2, 2 * buffer_rows // 3)
        self.d_model = rows.d_model
        self.layers = list(rows.layers)
        self.layer = self.layers[0]
        self.hook_name = f"blocks.{self.layer}.hook_resid_post"
        self.batches = 0
        self._rank_states: list[dict[str, Any]] = []
        self._reset((0, 0, 0), 0)

    # -- the row stream cut into chunks ---------------------------------------------------------
    def _reset(self, pos: tuple[int, int, int], gen: int) -> None:
        """Read on from document position `pos` = (epoch, sequence, row), chunk `gen` next."""
        self._it = self.rows.iterate(pos[0], pos[1])
        self._skip = pos[2]   # rows of sequence pos[1] already in an earlier chunk
        self._pending: tuple[tuple[int, int, int], torch.Tensor] | None = None
        self._gen, self._served, self._offset = gen, None, 0
        self._leftover: torch.Tensor | None = None
        self._starts: dict[int, tuple[int, int, int]] = {}

    def _next_rows(self) -> tuple[tuple[int, int, int], torch.Tensor]:
        if self._pending is not None:
            item, self._pending = self._pending, None
            return item
        while True:
            e, s, x = next(self._it)
            if self._skip:
                x, off, self._skip = x[self._skip:], self._skip, 0
            else:
                off = 0
            if len(x):
                return (e, s, off), x

    def _read_chunk(self) -> torch.Tensor:
        parts, need, start = [], self.chunk, None
        while need > 0:
            pos, x = self._next_rows()
            start = start or pos
            parts.append(x[:need])
            if len(x) > need:
                self._pending = ((pos[0], pos[1], pos[2] + need), x[need:])
            need -= len(parts[-1])
        self._starts[self._gen] = start
        return torch.cat(parts)

    def _perm(self, n: int, *key: int) -> torch.Tensor:
        return torch.from_numpy(np.random.default_rng([self.seed, *key]).permutation(n))

    def _next_generation(self) -> None:
        g = self._gen
        chunk = self._read_chunk()
        perm = self._perm(len(chunk), g).to(chunk.device)
        half = (len(chunk) + 1) // 2
        now, keep = chunk[perm[:half]], chunk[perm[half:]]
        pool = now if self._leftover is None else torch.cat([self._leftover, now])
        self._served = pool[self._perm(len(pool), g, 1).to(pool.device)]
        self._leftover, self._offset, self._gen = keep, 0, g + 1
        self._starts = {k: v for k, v in self._starts.items() if k >= g - 1}

    # -- serving --------------------------------------------------------------------------------
    def _take(self, n: int) -> torch.Tensor:
        out = []
        while n > 0:
            if self._served is None or self._offset >= len(self._served):
                self._next_generation()
                continue
            part = self._served[self._offset: self._offset + n]
            self._offset += len(part)
            n -= len(part)
            out.append(part)
        return torch.cat(out) if len(out) > 1 else out[0]

    def __iter__(self) -> LiveStore:
        return self

    def next_layers(self) -> dict[int, torch.Tensor]:
        """The next batch for every layer: {layer: [B, d] (or [B, 2, d])}, float32."""
        x = self._take(self.batch_size)
        self.batches += 1
        return {layer: x[:, i].float() for i, layer in enumerate(self.layers)}

    def __next__(self) -> torch.Tensor:
        return self.next_layers()[self.layer]

    def peek_batches(self, n: int) -> list[torch.Tensor]:
        """The first n batches' worth of rows in stream order (a fresh pass; for the
        normalisation factor), without moving this store."""
        return self.peek_layers(n)[self.layer]

    def peek_layers(self, n: int) -> dict[int, list[torch.Tensor]]:
        """`peek_batches` of every layer, from one fresh pass: {layer: n batches}."""
        it = self.rows.iterate(0, 0)
        rows, have = [], 0
        while have < n * self.batch_size:
            x = next(it)[2]
            rows.append(x)
            have += len(x)
        x = torch.cat(rows)[: n * self.batch_size]
        return {layer: list(x[:, i].float().split(self.batch_size))
                for i, layer in enumerate(self.layers)}

    # -- resume ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Generation being served, offset in it, and where its two chunks start (under
        torchrun: every rank's, as gathered by `sync_state`)."""
        if self.rank_local:
            return {"ranks": self._rank_states}
        return self._own_state()

    def _own_state(self) -> dict[str, Any]:
        if self._served is None:  # nothing drawn yet
            return {"batches": self.batches, "gen": -1, "offset": 0, "from_gen": 0,
                    "from": [0, 0, 0], "chunk": self.chunk}
        g = self._gen - 1
        first = max(g - 1, 0)
        return {"batches": self.batches, "gen": g, "offset": self._offset, "from_gen": first,
                "from": list(self._starts[first]), "chunk": self.chunk}

    def sync_state(self) -> None:
        """Under torchrun (every rank calls it at a checkpoint step): gather every rank's
        state, so rank 0's `state_dict` holds all of them (each rank reads its own shard)."""
        if not self.rank_local:
            return
        import torch.distributed as tdist

        mine = torch.tensor(list(json.dumps(self._own_state()).encode()), dtype=torch.uint8)
        n = torch.tensor([len(mine)])
        tdist.all_reduce(n, op=tdist.ReduceOp.MAX)
        padded = torch.zeros(int(n), dtype=torch.uint8)
        padded[: len(mine)] = mine
        parts = [torch.empty_like(padded) for _ in range(tdist.get_world_size())]
        tdist.all_gather(parts, padded)
        self._rank_states = [json.loads(bytes(p.tolist()).rstrip(b"\0")) for p in parts]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "ranks" in state:  # a torchrun checkpoint: this rank's own position
            from saediff.dist import current

            d = current()
            if len(state["ranks"]) != d.world_size:
                raise SaediffError(f"this live checkpoint was written by {len(state['ranks'])} "
                                   f"ranks; resume it with the same number (now "
                                   f"{d.world_size}): each rank reads its own documents")
            state = state["ranks"][d.rank]
        if state.get("chunk") != self.chunk:
            raise SaediffError(f"live store state has chunks of {state.get('chunk')} rows, this "
                               f"buffer makes {self.chunk}: resume with the same --buffer-tokens")
        self.batches = int(state["batches"])
        self._reset(tuple(state["from"]), int(state["from_gen"]))  # type: ignore[arg-type]
        if state["gen"] < 0:
            return
        while self._gen <= state["gen"]:  # chunk g-1 (its kept half), then chunk g
            self._next_generation()
        self._offset = int(state["offset"])

    def close(self) -> None:
        self._it = iter(())


def default_buffer_rows(row_shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """Rows of `row_shape` that fit BUFFER_BUDGET_BYTES."""
    per_row = math.prod(row_shape) * torch.empty((), dtype=dtype).element_size()
    return max(1, BUFFER_BUDGET_BYTES // per_row)
