"""The differ's two streaming passes over paired (base, fine-tuned) batches.

Pass 1 (`first_pass`) encodes every latent and keeps only O(d_sae) sums (`LatentStats`, plus the
per-prompt table when it fits), the residual sums for the diff-in-means directions and the
per-label sums. Pass 2 (`second_pass`) re-encodes only the reported latents: their per-token
values (evidence, AUROC, trajectory) and, when the prompt table did not fit, their per-prompt sums
for the confidence intervals.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from saediff.diff.data import DiffConfig, Example, ModelContext, Side
from saediff.diff.stream import LatentStats, rows_per_chunk
from saediff.models import LoadedModel, pad_batch, run_to_layer

log = logging.getLogger(__name__)


@torch.no_grad()
def encode_batch(lm: LoadedModel, sae: Any, layer: int, batch: list[list[int]],
                 latents: list[int] | None = None, rows: int = 1 << 30
                 ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(SAE latents [T_i, K], residuals [T_i, d_model]) of each sequence of one batch, on CPU.

    `latents` keeps only those columns (K = len(latents), default all); `rows` bounds the
    tokens encoded at once, so a long sequence never materialises [T, d_sae] in one piece.
    """
    dtype = next(sae.parameters()).dtype
    dev = next(sae.parameters()).device
    ids, mask = pad_batch(batch, lm.tokenizer.pad_token_id)
    h = run_to_layer(lm, ids, mask, layer)
    lat = torch.tensor(latents, device=dev) if latents is not None else None
    out = []
    for i, seq in enumerate(batch):
        r = h[i, : len(seq)].to(dev, dtype)  # LM may run in bf16; SAE math in its own dtype
        parts = []
        for s in range(0, len(seq), rows):
            a = sae.encode(r[s: s + rows])
            parts.append((a if lat is None else a[:, lat]).float().cpu())
        out.append((torch.cat(parts) if parts else torch.zeros(0, sae.W_dec.shape[0] if lat is None
                                                                   else len(lat)),
                    r.float().cpu()))
    return out


def context(fn: ModelContext | None, lm: LoadedModel) -> contextlib.AbstractContextManager[Any]:
    """`fn(lm)` (the fine-tuned-side context of `run_diff`), or nothing."""
    return fn(lm) if fn is not None else contextlib.nullcontext()


@dataclass
class Sides:
    """The measured token sets: examples and their base / fine-tuned encodings."""

    examples: list[Example]
    base: Side
    finetuned: Side

    def rows(self, i0: int, ab: list[Any], af: list[Any]) -> Iterator[tuple[Any, ...]]:
        """(example, base token mask, fine-tuned token mask, base out, fine-tuned out) of the
        batch that starts at example `i0`."""
        for k, (b, f) in enumerate(zip(ab, af)):
            i = i0 + k
            yield self.examples[i], self.base.select[i], self.finetuned.select[i], b, f


def paired(base: LoadedModel, final: LoadedModel, sae: Any, cfg: DiffConfig, sides: Sides,
           fn: ModelContext | None, latents: list[int] | None, rows: int
           ) -> Iterator[tuple[int, tuple[list[Any], list[Any]]]]:
    """(first example index, (base, fine-tuned) `encode_batch` outputs) batch by batch; the
    fine-tuned context is entered per batch so it never wraps a base forward."""
    bs = cfg.batch_size
    for i0 in range(0, len(sides.base.ids), bs):
        ab = encode_batch(base, sae, cfg.layer, sides.base.ids[i0: i0 + bs], latents, rows)
        with context(fn, final):
            af = encode_batch(final, sae, cfg.layer, sides.finetuned.ids[i0: i0 + bs], latents, rows)
        yield i0, (ab, af)


@dataclass
class FirstPass:
    """What pass 1 keeps: the latent statistics and the residual sums for the directions."""

    stats: LatentStats
    keep_groups: bool  # the per-prompt table of every latent fit in half the memory budget
    n_groups: int
    budget: float
    rows_at_once: int
    rsum_b: torch.Tensor
    rsum_f: torch.Tensor
    label_sums: dict[int, torch.Tensor] = field(default_factory=dict)
    label_n: dict[int, list[int]] = field(default_factory=dict)  # label -> [examples, tokens]


def first_pass(base: LoadedModel, final: LoadedModel, sae: Any, cfg: DiffConfig, sides: Sides,
               fn: ModelContext | None) -> FirstPass:
    """Every latent, streamed; only O(d_sae) sums (and the prompt table) survive a batch."""
    d_sae = int(sae.W_dec.shape[0])
    budget = cfg.max_memory_gb * 2 ** 30
    n_groups = max(e.group for e in sides.examples) + 1
    # the per-prompt shift table serves every latent's CI; beyond half the budget, the CIs
    # come from the second pass and cover only the latents that fit
    keep_groups = LatentStats.table_bytes(d_sae, n_groups) <= budget / 2
    zeros = torch.zeros(base.d_model, dtype=torch.float64)
    p = FirstPass(LatentStats(d_sae, n_groups, cfg.fire_threshold, keep_groups), keep_groups,
                  n_groups, budget, rows_per_chunk(d_sae, budget), zeros.clone(), zeros.clone(),
                  {0: zeros.clone(), 1: zeros.clone()}, {0: [0, 0], 1: [0, 0]})
    for i0, (ab, af) in paired(base, final, sae, cfg, sides, fn, None, p.rows_at_once):
        for e, mb, mf, (a_b, r_b), (a_f, r_f) in sides.rows(i0, ab, af):
            p.stats.update(a_b[mb], a_f[mf], torch.full((int(mb.sum()),), e.group))
            p.rsum_b += r_b[mb].double().sum(0)
            p.rsum_f += r_f[mf].double().sum(0)
            if e.label is not None:
                p.label_sums[e.label] += r_f[mf].double().sum(0)
                p.label_n[e.label][0] += 1
                p.label_n[e.label][1] += int(mf.sum())
    return p


@dataclass
class SecondPass:
    """The top latents' per-token values; the CI latents' per-prompt sums (when needed)."""

    top: list[int]
    acts_b: list[torch.Tensor]  # [T_i, len(top)] per example
    acts_f: list[torch.Tensor]
    ci_latents: list[int]  # empty when pass 1 kept the prompt table of every latent
    group_sums: torch.Tensor  # [n_groups, len(ci_latents)]
    n_ci: int


def second_pass(base: LoadedModel, final: LoadedModel, sae: Any, cfg: DiffConfig, sides: Sides,
                fn: ModelContext | None, first: FirstPass) -> SecondPass:
    """Only the reported latents (the top `cfg.top_k`, plus the CI latents when the prompt table
    did not fit), with their columns remapped from latent index to position in `keep`."""
    d_sae = first.stats.d_sae
    order = first.stats.order(cfg.rank_by, cfg.direction).tolist()
    top = order[: cfg.top_k]
    n_ci = d_sae if first.keep_groups else max(
        cfg.top_k, min(d_sae, int(first.budget / 2 / 8 / first.n_groups)))
    ci_lat = [] if first.keep_groups else order[:n_ci]
    keep = list(dict.fromkeys(top + ci_lat))
    col = {j: c for c, j in enumerate(keep)}
    ci_cols = torch.tensor([col[j] for j in ci_lat], dtype=torch.long)
    t_cols = torch.tensor([col[j] for j in top], dtype=torch.long)
    out = SecondPass(top, [], [], ci_lat, torch.zeros(first.n_groups, len(ci_lat),
                                                      dtype=torch.float64), n_ci)
    for i0, (ab, af) in paired(base, final, sae, cfg, sides, fn, keep, first.rows_at_once):
        for e, mb, mf, (a_b, _), (a_f, _) in sides.rows(i0, ab, af):
            if ci_lat:
                out.group_sums[e.group] += (a_f[mf][:, ci_cols].double()
                                            - a_b[mb][:, ci_cols].double()).sum(0)
            out.acts_b.append(a_b[:, t_cols])
            out.acts_f.append(a_f[:, t_cols])
    if not first.keep_groups:
        log.warning("per-prompt table of %d latents x %d prompts exceeds --max-memory-gb %.2g: "
                    "confidence intervals cover the top %d latents only (the rest are NaN)",
                    d_sae, first.n_groups, cfg.max_memory_gb, n_ci)
    return out
