"""Evidence for top latents: top-activating contexts, activation histograms, logit tokens."""
from __future__ import annotations

import logging
from typing import Any

import torch

from saediff.diff.data import DiffConfig, Example, Side
from saediff.diff.directions import logit_tokens
from saediff.errors import SaediffError
from saediff.stats import histogram

log = logging.getLogger(__name__)


def _tok_strs(tok: Any, ids: list[int]) -> list[str]:
    return [str(t) for t in tok.convert_ids_to_tokens([int(i) for i in ids])]


def diffset_contexts(tok: Any, latent: int, side_f: Side, acts_f: list[torch.Tensor],
                     side_b: Side, acts_b: list[torch.Tensor], n: int = 5, window: int = 16
                     ) -> list[dict[str, Any]]:
    """The `n` sequences where the latent peaks highest (fine-tuned side) on measured tokens."""
    peaks = []
    for i, (a, m) in enumerate(zip(acts_f, side_f.select)):
        if m.any():
            v = a[:, latent].masked_fill(~m, float("-inf"))
            p = int(v.argmax())
            peaks.append((float(v[p]), i, p))
    peaks.sort(reverse=True)
    out = []
    for val, i, p in peaks[:n]:
        lo, hi = max(0, p - window), min(len(side_f.ids[i]), p + window // 2 + 1)
        ctx: dict[str, Any] = {"example": i, "peak": val, "peak_pos": p - lo,
                               "tokens": _tok_strs(tok, side_f.ids[i][lo:hi]),
                               "acts_finetuned": [round(float(x), 4) for x in acts_f[i][lo:hi, latent]]}
        if side_b.ids[i] == side_f.ids[i]:
            ctx["acts_base"] = [round(float(x), 4) for x in acts_b[i][lo:hi, latent]]
        out.append(ctx)
    return out


@torch.no_grad()
def check_contexts_cache(path: str, sae: Any, layer: int, tokenizer_fp: str) -> None:
    """--contexts-cache must hold the SAE's layer and width, tokenized like the diffed models
    (else the top contexts would be another layer's, or decode to other words)."""
    from saediff import open_cache

    with open_cache(path) as c:
        d_in = int(sae.cfg.d_in)
        problems = [f"layer {c.layer}, not the SAE's {layer}"] if c.layer != layer else []
        problems += [f"d_model {c.d_model}, not the SAE's d_in {d_in}"] if c.d_model != d_in else []
        fp = c.attrs.get("tokenizer_fingerprint")
        problems += ["another tokenizer than the diffed models'"] if fp and fp != tokenizer_fp \
            else []
    if problems:
        raise SaediffError(f"--contexts-cache {path} holds {'; '.join(problems)}; give a cache "
                           f"built with `saediff cache --layer {layer}` from these models")


def cache_contexts(path: str, sae: Any, latents: list[int], tok: Any, n: int = 5, window: int = 16,
                   chunk: int = 8192) -> dict[int, list[dict[str, Any]]]:
    """Top-activating rows of each latent over an activation cache (all its sources)."""
    from saediff import open_cache

    cache = open_cache(path)
    dev = next(sae.parameters()).device
    lat = torch.tensor(latents)
    best: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    try:
        for src in cache.sources:
            vals = torch.full((n, len(latents)), float("-inf"))
            rows = torch.zeros((n, len(latents)), dtype=torch.long)
            for s in range(0, cache.rows, chunk):
                e = min(cache.rows, s + chunk)
                a = sae.encode(cache.activations(src, s, e).to(dev)).float().cpu()[:, lat]
                keep = torch.from_numpy(cache.roles(s, e) != 0)
                a = a.masked_fill(~keep.unsqueeze(1), float("-inf"))
                allv = torch.cat([vals, a])
                allr = torch.cat([rows, torch.arange(s, e).unsqueeze(1).expand(-1, len(latents))])
                top = allv.topk(min(n, allv.shape[0]), dim=0)
                vals, rows = top.values, allr.gather(0, top.indices)
            best[src] = (vals, rows)
        out: dict[int, list[dict[str, Any]]] = {j: [] for j in latents}
        cands = []
        for src, (vals, rows) in best.items():
            for c, j in enumerate(latents):
                for v, r in zip(vals[:, c].tolist(), rows[:, c].tolist()):
                    if v > float("-inf"):
                        cands.append((v, j, c, src, r))
        cands.sort(reverse=True)
        for v, j, _c, src, r in cands:
            if len(out[j]) >= n:
                continue
            seq = int(cache.sequence_ids(r, r + 1)[0])
            lo, hi = max(0, r - window), min(cache.rows, r + window // 2 + 1)
            same = cache.sequence_ids(lo, hi) == seq
            idx = [k for k, ok in zip(range(lo, hi), same) if ok]
            a, b = idx[0], idx[-1] + 1
            acts = sae.encode(cache.activations(src, a, b).to(dev)).float().cpu()[:, j]
            out[j].append({"source": src, "row": r, "peak": v, "peak_pos": r - a,
                           "tokens": _tok_strs(tok, cache.tokens(a, b).tolist()),
                           "acts_finetuned" if src != "base" else "acts_base":
                               [round(float(x), 4) for x in acts]})
        return out
    finally:
        cache.close()


def collect_evidence(cfg: DiffConfig, sae: Any, lm: Any, top_rows: list[dict[str, Any]],
                     examples: list[Example], side_b: Side, side_f: Side,
                     acts_b: list[torch.Tensor], acts_f: list[torch.Tensor],
                     w_dec: torch.Tensor, columns: list[int] | None = None) -> list[dict[str, Any]]:
    """One evidence record per top latent (contexts, histograms on both models, logit tokens).

    `columns` names the latents that the columns of `acts_*` hold (default: every latent).
    """
    tok = lm.tokenizer
    latents = [r["latent"] for r in top_rows]
    cols = [columns.index(j) for j in latents] if columns is not None else latents
    from_cache: dict[int, list[dict[str, Any]]] = {}
    if cfg.contexts_cache:
        from_cache = cache_contexts(cfg.contexts_cache, sae, latents, tok)
    sel_b = torch.cat([a[m][:, cols] for a, m in zip(acts_b, side_b.select)])
    sel_f = torch.cat([a[m][:, cols] for a, m in zip(acts_f, side_f.select)])
    out = []
    for c, row in enumerate(top_rows):
        j = row["latent"]
        vb, vf = sel_b[:, c], sel_f[:, c]
        hi = float(torch.cat([vb, vf]).max()) if vb.numel() else 1.0
        pos_b, pos_f = vb[vb > cfg.fire_threshold], vf[vf > cfg.fire_threshold]
        out.append({
            "latent": j, "rank": row["rank"], "direction": row["direction"],
            "mean_shift": row["mean_shift"], "ci_low": row["ci_low"], "ci_high": row["ci_high"],
            "contexts_source": "cache" if cfg.contexts_cache else "diff set",
            "contexts": from_cache.get(j) if cfg.contexts_cache else
            diffset_contexts(tok, cols[c], side_f, acts_f, side_b, acts_b),
            "hist": {"base": histogram(pos_b, 30, 0.0, hi), "finetuned": histogram(pos_f, 30, 0.0, hi),
                     "zero_frac_base": float((vb <= cfg.fire_threshold).double().mean()),
                     "zero_frac_finetuned": float((vf <= cfg.fire_threshold).double().mean())},
            "logit_tokens": logit_tokens(lm, w_dec[j]),
        })
    return out
