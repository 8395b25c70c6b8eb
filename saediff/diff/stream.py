"""Streaming per-latent statistics of paired (base, fine-tuned) token activations.

The differ never holds every token's latents: each chunk of paired activations [n, d_sae]
is folded into per-latent sums, fire counts and per-prompt sums of the shift, then dropped.
Memory is O(d_sae) plus the per-prompt table [prompts, d_sae] the bootstrap needs, which is
kept only when it fits the budget (otherwise the caller supplies per-prompt sums for the
latents it reports, from a second pass restricted to them).
"""
from __future__ import annotations

import logging
import math
from typing import Any

import torch

from saediff.errors import SaediffError
from saediff.stats import bootstrap_mean_ci

log = logging.getLogger(__name__)


def rows_per_chunk(d_sae: int, budget_bytes: float) -> int:
    """Token rows per chunk so that a chunk's float64 temporaries (~8 copies of [rows, d_sae])
    stay within a quarter of the budget."""
    return max(1, int(budget_bytes / 4 / (d_sae * 8 * 8)))


class LatentStats:
    """Per-latent sums over paired activations, fed chunk by chunk (`update`), ranked by `table`.

    `n_groups` prompts index the bootstrap; `keep_groups=False` drops the per-prompt table
    (then `table` needs `group_sums` for the latents whose CI it should report).
    """

    def __init__(self, d_sae: int, n_groups: int, fire_threshold: float = 0.0,
                 keep_groups: bool = True) -> None:
        z = lambda: torch.zeros(d_sae, dtype=torch.float64)  # noqa: E731
        self.d_sae, self.fire_threshold = d_sae, fire_threshold
        self.sum_b, self.sum_f, self.fire_b, self.fire_f, self.on_sum, self.n_on = (z() for _ in range(6))
        self.n = 0
        self.counts = torch.zeros(n_groups, dtype=torch.float64)
        self.gsum = torch.zeros(n_groups, d_sae, dtype=torch.float64) if keep_groups else None

    @staticmethod
    def table_bytes(d_sae: int, n_groups: int) -> int:
        return 8 * d_sae * n_groups

    def update(self, acts_b: torch.Tensor, acts_f: torch.Tensor, groups: torch.Tensor) -> None:
        """Fold in paired activations [n, d_sae] of the same tokens; `groups` [n] their prompts."""
        if acts_b.shape != acts_f.shape or acts_b.shape[1:] != (self.d_sae,):
            raise SaediffError(f"paired activations differ in shape: {tuple(acts_b.shape)} vs "
                               f"{tuple(acts_f.shape)} (d_sae {self.d_sae})")
        if acts_b.shape[0] == 0:
            return
        a, b, g = acts_b.double(), acts_f.double(), groups.long()
        on_a, on_b = a > self.fire_threshold, b > self.fire_threshold
        self.sum_b += a.sum(0)
        self.sum_f += b.sum(0)
        self.fire_b += on_a.sum(0)
        self.fire_f += on_b.sum(0)
        self.n_on += on_a.sum(0) + on_b.sum(0)
        self.on_sum += (a * on_a).sum(0) + (b * on_b).sum(0)
        self.n += a.shape[0]
        self.counts.index_add_(0, g, torch.ones(len(g), dtype=torch.float64))
        if self.gsum is not None:
            self.gsum.index_add_(0, g, b - a)

    def means(self) -> dict[str, torch.Tensor]:
        """mean_base/finetuned, freq_base/finetuned, typical_act, mean/norm/freq shifts [d_sae]."""
        if self.n == 0:
            raise SaediffError("no tokens to rank latents on")
        mb, mf = self.sum_b / self.n, self.sum_f / self.n
        fb, ff = self.fire_b / self.n, self.fire_f / self.n
        typical = torch.where(self.n_on > 0, self.on_sum / self.n_on.clamp_min(1),
                              torch.zeros_like(self.on_sum))
        shift = mf - mb
        norm = torch.where(typical > 0, shift / typical.clamp_min(1e-12), torch.zeros_like(shift))
        return {"mean_base": mb, "mean_finetuned": mf, "freq_base": fb, "freq_finetuned": ff,
                "typical_act": typical, "mean_shift": shift, "norm_shift": norm, "freq_shift": ff - fb}

    def order(self, rank_by: str = "mean_shift", direction: str = "both") -> torch.Tensor:
        """Latent indices, rank order (stable: ties keep latent order)."""
        stat = self.means()[rank_by]
        score = {"both": stat.abs(), "up": stat, "down": -stat}[direction]
        return torch.argsort(score, descending=True, stable=True)

    def table(self, rank_by: str = "mean_shift", direction: str = "both", n_boot: int = 1000,
              ci_level: float = 0.95, seed: int = 0, chunk: int = 4096,
              group_sums: tuple[list[int], torch.Tensor] | None = None) -> list[dict[str, Any]]:
        """One row per latent in rank order. CIs resample prompts; without the per-prompt table,
        only the latents in `group_sums` = (latents, sums [prompts, len(latents)]) get one
        (the others NaN)."""
        m = self.means()
        lo = torch.full((self.d_sae,), math.nan)
        hi = torch.full((self.d_sae,), math.nan)
        if self.gsum is not None:
            for s in range(0, self.d_sae, chunk):  # latent chunks bound the replicate matrix
                lo[s: s + chunk], hi[s: s + chunk] = bootstrap_mean_ci(
                    self.gsum[:, s: s + chunk], self.counts, n_boot, ci_level, seed)
        elif group_sums is not None and group_sums[0]:
            idx = torch.tensor(group_sums[0])
            for s in range(0, len(idx), chunk):
                lo[idx[s: s + chunk]], hi[idx[s: s + chunk]] = bootstrap_mean_ci(
                    group_sums[1][:, s: s + chunk], self.counts, n_boot, ci_level, seed)
        cols = {k: v.tolist() for k, v in m.items()}
        lo_l, hi_l = lo.tolist(), hi.tolist()
        rows = []
        for r, j in enumerate(self.order(rank_by, direction).tolist()):
            sh = cols["mean_shift"][j]
            rows.append({"rank": r + 1, "latent": j, "mean_shift": sh,
                         "ci_low": lo_l[j], "ci_high": hi_l[j],
                         "direction": "up" if sh >= 0 else "down",
                         "mean_base": cols["mean_base"][j], "mean_finetuned": cols["mean_finetuned"][j],
                         "freq_base": cols["freq_base"][j], "freq_finetuned": cols["freq_finetuned"][j],
                         "freq_shift": cols["freq_shift"][j], "typical_act": cols["typical_act"][j],
                         "norm_shift": cols["norm_shift"][j],
                         "significant": bool(lo_l[j] > 0 or hi_l[j] < 0)})
        return rows
