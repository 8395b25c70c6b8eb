"""Activation measurements of the in-context EM experiment.

`measure` runs one model (optionally under a steering context) on encoded sequences and keeps,
per question, the sum of the residuals at the measured tokens (and their SAE latents). From
two such measurements: the in-context direction (misaligned − aligned shots) with bootstrap
CIs of its cosine to reference directions, projections on the fine-tune's direction, and the
differ's latent ranking on the two prompt conditions.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch

from saediff.diff.differ import latent_activations, rank_latents
from saediff.errors import SaediffError
from saediff.models import ROLE_PROMPT, ROLE_RESPONSE, encode_chat, pad_batch, run_to_layer
from saediff.stats import bootstrap_mean_ci, bootstrap_replicates


@dataclass
class Encoded:
    """Token ids per sequence, its measured-token mask, and its question index (the group)."""

    ids: list[list[int]]
    select: list[torch.Tensor]
    groups: list[int]

    def n_tokens(self) -> list[int]:
        return [len(x) for x in self.ids]


@dataclass
class Measured:
    """One model condition on one `Encoded` set: per-question residual sums at the measured
    tokens [G, d], their counts [G], and (with an SAE) the measured tokens' latents."""

    sums: torch.Tensor
    counts: torch.Tensor
    acts: torch.Tensor | None
    groups: torch.Tensor

    def mean(self) -> torch.Tensor:
        return self.sums.sum(0) / self.counts.sum().clamp_min(1)


def encode_questions(tok: Any, items: list[dict[str, Any]], histories: list[list[tuple[str, str]]],
                     system: str | None) -> Encoded:
    """Each evaluation question after its shots (earlier chat turns); measured = its tokens."""
    ids, sel = [], []
    for item, hist in zip(items, histories):
        i, r = encode_chat(tok, item["prompt"], None, system, history=hist)
        ids.append(i)
        sel.append(torch.tensor([x == ROLE_PROMPT for x in r], dtype=torch.bool))
    return Encoded(ids, sel, list(range(len(items))))


def encode_answers(tok: Any, rows: list[tuple[str, str]]) -> Encoded:
    """(prompt, answer) chats; measured = the answer's tokens (for the persona mean-diff)."""
    ids, sel = [], []
    for p, a in rows:
        i, r = encode_chat(tok, p, a)
        ids.append(i)
        sel.append(torch.tensor([x == ROLE_RESPONSE for x in r], dtype=torch.bool))
    return Encoded(ids, sel, list(range(len(rows))))


def check_paired(a: Encoded, b: Encoded) -> None:
    """Both sides must measure the same tokens (paired per-token differences)."""
    for k, (x, mx, y, my) in enumerate(zip(a.ids, a.select, b.ids, b.select)):
        tx = [t for t, s in zip(x, mx) if s]
        ty = [t for t, s in zip(y, my) if s]
        if tx != ty or not tx:
            raise SaediffError(f"question {k}: the measured tokens differ between the two shot "
                               "conditions (or are empty); the shots changed how it tokenizes")


@torch.no_grad()
def measure(lm: Any, sae: Any, layer: int, enc: Encoded,
            context: Callable[[Any], AbstractContextManager[Any]] | None = None,
            batch_size: int = 8) -> Measured:
    """Residuals (and SAE latents) after block `layer` at the measured tokens of `enc`."""
    batches = [enc.ids[i: i + batch_size] for i in range(0, len(enc.ids), batch_size)]
    ctx = context(lm) if context is not None else contextlib.nullcontext()
    if sae is not None:
        acts, resid = latent_activations(lm, sae, layer, batches, ctx, return_resid=True)
    else:
        acts, resid = None, []
        with ctx:
            for b in batches:
                ids, mask = pad_batch(b, lm.tokenizer.pad_token_id)
                h = run_to_layer(lm, ids, mask, layer).float().cpu()
                resid += [h[i, : len(s)] for i, s in enumerate(b)]
    g = max(enc.groups) + 1
    sums = torch.zeros(g, resid[0].shape[-1], dtype=torch.float64)
    counts = torch.zeros(g, dtype=torch.float64)
    for r, m, q in zip(resid, enc.select, enc.groups):
        sums[q] += r[m].double().sum(0)
        counts[q] += float(m.sum())
    sel_acts = torch.cat([a[m] for a, m in zip(acts, enc.select)]) if acts is not None else None
    groups = torch.cat([torch.full((int(m.sum()),), q) for m, q in zip(enc.select, enc.groups)])
    return Measured(sums, counts, sel_acts, groups)


def unit(v: torch.Tensor) -> torch.Tensor | None:
    n = v.double().norm()
    return None if not torch.isfinite(n) or n < 1e-12 else (v.double() / n)


def cosines_ci(diff_sums: torch.Tensor, counts: torch.Tensor, targets: dict[str, torch.Tensor],
               n_boot: int, level: float, seed: int) -> dict[str, dict[str, Any]]:
    """cos(direction, target) with a bootstrap CI over questions, where direction is the
    token-weighted mean of the per-question difference sums; null for a zero vector."""
    point = diff_sums.sum(0) / counts.sum().clamp_min(1)
    u = unit(point)
    out: dict[str, dict[str, Any]] = {}
    if u is None:
        return {name: {"cos": None, "ci": [None, None]} for name in targets}
    reps = bootstrap_replicates(diff_sums, counts, n_boot, seed)
    reps = reps / reps.norm(dim=1, keepdim=True).clamp_min(1e-30)
    alpha = (1 - level) / 2
    for name, t in targets.items():
        tu = unit(t)
        if tu is None:
            out[name] = {"cos": None, "ci": [None, None]}
            continue
        c = reps @ tu
        lo, hi = torch.quantile(c, torch.tensor([alpha, 1 - alpha], dtype=torch.float64))
        out[name] = {"cos": round(float(u @ tu), 4), "ci": [round(float(lo), 4), round(float(hi), 4)]}
    return out


def projection(m: Measured, direction: torch.Tensor, n_boot: int, level: float,
               seed: int) -> dict[str, Any]:
    """Mean of h · d̂ over the measured tokens, with a bootstrap CI over questions."""
    d = unit(direction)
    if d is None:
        return {"mean": None, "ci": [None, None]}
    s = (m.sums @ d)[:, None]
    lo, hi = bootstrap_mean_ci(s, m.counts, n_boot, level, seed)
    return {"mean": round(float(s.sum() / m.counts.sum()), 4),
            "ci": [round(float(lo[0]), 4), round(float(hi[0]), 4)]}


def ranked(a: Measured, b: Measured, n_boot: int, level: float, seed: int, top_k: int,
           direction: str = "both") -> list[dict[str, Any]]:
    """The differ's ranking of latents shifting from `a` to `b` (paired tokens), top rows."""
    if a.acts is None or b.acts is None:
        return []
    rows = rank_latents(a.acts, b.acts, a.groups, direction=direction, n_boot=n_boot,
                        ci_level=level, seed=seed)
    keep = ("rank", "latent", "mean_shift", "ci_low", "ci_high", "direction", "significant")
    return [{k: r[k] for k in keep if k in r} for r in rows[:top_k]]


def overlap(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> dict[str, Any]:
    """Shared latents of two top lists, and the rank in `a` of `b`'s first latent."""
    la, lb = [int(r["latent"]) for r in a], [int(r["latent"]) for r in b]
    shared = [j for j in la if j in lb]
    first = lb[0] if lb else None
    return {"shared": shared, "n_shared": len(shared), "of": min(len(la), len(lb)),
            "finetune_top_latent": first,
            "finetune_top_latent_rank_in_icl": (la.index(first) + 1) if first in la else None}


def k_reached(ks: list[int], values: list[float | None], target: float | None) -> int | None:
    """The smallest k whose value is at least `target` (None: not reached / unknown)."""
    if target is None:
        return None
    for k, v in zip(ks, values):
        if v is not None and v >= target:
            return k
    return None
