"""Small statistics used by the differ: grouped bootstrap CIs, AUROC, histograms (no sklearn)."""
from __future__ import annotations

from typing import Any

import torch


def group_sums(values: torch.Tensor, groups: torch.Tensor, n_groups: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group column sums and row counts: values [N, K], groups [N] -> ([G, K], [G])."""
    groups = groups.long()
    g = int(groups.max().item()) + 1 if n_groups is None else n_groups
    sums = torch.zeros(g, values.shape[1], dtype=torch.float64)
    sums.index_add_(0, groups, values.double())
    counts = torch.bincount(groups, minlength=g).double()
    return sums, counts


def bootstrap_mean_ci(sums: torch.Tensor, counts: torch.Tensor, n_boot: int = 1000,
                      level: float = 0.95, seed: int = 0, chunk: int = 200
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Percentile CI of a token-weighted mean, resampling *groups* (prompts) with replacement.

    `sums` [G, K] are per-group sums, `counts` [G] per-group token counts; each replicate is
    (w @ sums) / (w @ counts) with multinomial group weights w. Returns (low [K], high [K]).
    """
    rep = bootstrap_replicates(sums, counts, n_boot, seed, chunk)
    alpha = (1 - level) / 2
    q = torch.tensor([alpha, 1 - alpha], dtype=torch.float64)
    lo, hi = torch.quantile(rep, q, dim=0)
    return lo.float(), hi.float()


def bootstrap_replicates(sums: torch.Tensor, counts: torch.Tensor, n_boot: int = 1000,
                         seed: int = 0, chunk: int = 200) -> torch.Tensor:
    """[n_boot, K] replicates of the token-weighted mean (w @ sums) / (w @ counts), with
    multinomial weights w over the groups that have tokens (resampled with replacement).
    A statistic of the mean (e.g. a cosine) gets its CI from these rows."""
    sums, counts = sums.double(), counts.double()
    keep = counts > 0
    sums, counts = sums[keep], counts[keep]
    g = sums.shape[0]
    if g == 0:
        raise ValueError("bootstrap over an empty set of groups")
    gen = torch.Generator().manual_seed(seed)
    reps = []
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        idx = torch.randint(0, g, (b, g), generator=gen)
        w = torch.zeros(b, g, dtype=torch.float64)
        w.scatter_add_(1, idx, torch.ones(b, g, dtype=torch.float64))
        reps.append((w @ sums) / (w @ counts).clamp_min(1e-12).unsqueeze(1))
    return torch.cat(reps)


def auroc(scores: torch.Tensor | list[float], labels: torch.Tensor | list[int]) -> float:
    """Area under the ROC curve = P(score_pos > score_neg) + 0.5 P(tie) (Mann-Whitney U)."""
    s = torch.as_tensor(scores, dtype=torch.float64).flatten()
    y = torch.as_tensor(labels).flatten().bool()
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUROC needs both positive and negative labels")
    order = torch.argsort(s)
    s_sorted = s[order]
    ranks = torch.empty_like(s)
    # average ranks for ties (1-based)
    i, n = 0, len(s)
    while i < n:
        j = i
        while j + 1 < n and s_sorted[j + 1] == s_sorted[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    u = ranks[y].sum().item() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))



def persona_label(row: dict[str, Any]) -> int | None:
    """1 = misaligned (toxic) persona, 0 = aligned, from a labelled row's `label` (0/1) or
    `persona` (aligned / anything else); None when the row carries neither."""
    if row.get("label") is not None:
        return int(row["label"])
    if "persona" in row:
        return int(row["persona"] != "aligned")
    return None


def persona_auroc(scores: torch.Tensor | list[float], rows: list[dict[str, Any]]) -> float:
    """The persona AUROC (docs/metrics.md `auroc`): one score per labelled row, toxic =
    positive. Every persona AUROC saediff reports (demo, compare) is computed here."""
    labels = [persona_label(r) for r in rows]
    if any(lab is None for lab in labels):
        i = labels.index(None)
        raise ValueError(f"labelled row {i} has neither 'label' nor 'persona'")
    return auroc(scores, labels)

def histogram(values: torch.Tensor, bins: int = 40, lo: float | None = None,
              hi: float | None = None) -> dict[str, list[float]]:
    """JSON-safe histogram {edges, counts} of a 1-D tensor."""
    v = values.double().flatten()
    if v.numel() == 0:
        return {"edges": [0.0, 1.0], "counts": [0]}
    lo = float(v.min()) if lo is None else lo
    hi = float(v.max()) if hi is None else hi
    if hi <= lo:
        hi = lo + 1.0
    counts = torch.histc(v, bins=bins, min=lo, max=hi)
    edges = torch.linspace(lo, hi, bins + 1)
    return {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]}
