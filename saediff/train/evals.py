"""Held-out evals of a trained SAE, separately for every source (model) in the cache.

Per source: FVU, mean L0, dead and dense latent fractions on held-out rows (the last
`eval_fraction` of sequences, never trained on), and the next-token loss increase and KL when
the SAE reconstruction replaces the residual stream after block `layer` in that source's own
model. Loss and KL count only next tokens whose role is trained on (not `special`); the splice
touches only those positions too, so BOS/template tokens keep their (huge-norm) activations.

An SAE that reconstructs one model well and the other badly is a trap for diffing (latent
shifts then partly measure reconstruction error), so `fvu_rel` (FVU / best source's FVU) is
recorded and a warning logged when the sources differ by more than 1.5x.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from saediff.errors import SaediffError
from saediff.io import write_json

log = logging.getLogger(__name__)

DENSE_FREQ = 0.1
"""A latent firing on more than this share of held-out tokens counts as dense."""


@torch.no_grad()
def activation_evals(sae: Any, cache: Any, source: str, rows: tuple[int, int], codes: list[int],
                     max_rows: int, chunk: int = 8192) -> dict[str, Any]:
    """FVU / L0 / dead / dense of `sae` on the held-out rows of one source."""
    lo, hi = rows
    n = 0
    sse = 0.0
    sx = torch.zeros(cache.d_model, dtype=torch.float64)
    sxx = 0.0
    l0 = 0.0
    fires = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)
    for a in range(lo, hi, chunk):
        if n >= max_rows:
            break
        b = min(hi, a + chunk)
        keep = np.isin(cache.roles(a, b), codes)
        x = cache.activations(source, a, b)[torch.from_numpy(keep)][: max_rows - n]
        if not len(x):
            continue
        x = x.to(sae.device)
        f = sae.encode(x)
        x_hat = sae.decode(f)
        sse += (x - x_hat).double().pow(2).sum().item()
        sx += x.double().sum(0).cpu()
        sxx += x.double().pow(2).sum().item()
        active = f != 0
        l0 += active.sum().item()
        fires += active.sum(0).double().cpu()
        n += len(x)
    if n == 0:
        raise SaediffError(f"{cache.path}: no held-out rows of the trained roles for {source!r}")
    var = sxx - sx.pow(2).sum().item() / n
    freq = fires / n
    return {"fvu": sse / var if var > 0 else math.nan, "l0": l0 / n,
            "dead_frac": (freq == 0).double().mean().item(),
            "dense_frac": (freq > DENSE_FREQ).double().mean().item(),
            "mse": sse / n, "n_rows": n}


@torch.no_grad()
def spliced_lm_evals(sae: Any, lm: Any, layer: int, seqs: list[dict[str, Any]], codes: list[int],
                     batch_size: int = 8) -> dict[str, Any]:
    """CE clean vs CE with the SAE reconstruction spliced in after block `layer`, and KL."""
    from saediff.models import pad_batch

    code_t = torch.tensor(codes)
    tot = {"ce_clean": 0.0, "ce_spliced": 0.0, "kl": 0.0, "n": 0}
    dev = lm.device
    for i in range(0, len(seqs), batch_size):
        part = seqs[i: i + batch_size]
        ids, mask = pad_batch([s["ids"] for s in part], lm.tokenizer.pad_token_id)
        roles = torch.zeros_like(ids)
        for j, s in enumerate(part):
            roles[j, : len(s["roles"])] = torch.tensor(s["roles"])
        trained = torch.isin(roles, code_t) & mask.bool()
        target_ok = trained[:, 1:]
        if not target_ok.any():
            continue
        ids_d, mask_d = ids.to(dev), mask.to(dev)
        clean = lm.model(input_ids=ids_d, attention_mask=mask_d).logits[:, :-1].float()
        sel = trained.to(dev)

        def hook(_m: Any, _i: Any, out: Any, sel: torch.Tensor = sel) -> Any:
            h = out[0] if isinstance(out, tuple) else out
            new = h.clone()
            new[sel] = sae(h[sel].float()).to(h.dtype)
            return (new, *out[1:]) if isinstance(out, tuple) else new

        handle = lm.layers[layer].register_forward_hook(hook)
        try:
            spliced = lm.model(input_ids=ids_d, attention_mask=mask_d).logits[:, :-1].float()
        finally:
            handle.remove()
        tgt = ids_d[:, 1:]
        m = target_ok.to(dev)
        lp_c = torch.log_softmax(clean, -1)
        lp_s = torch.log_softmax(spliced, -1)
        ce_c = -lp_c.gather(-1, tgt[..., None])[..., 0]
        ce_s = -lp_s.gather(-1, tgt[..., None])[..., 0]
        kl = (lp_c.exp() * (lp_c - lp_s)).sum(-1)
        tot["ce_clean"] += ce_c[m].sum().item()
        tot["ce_spliced"] += ce_s[m].sum().item()
        tot["kl"] += kl[m].sum().item()
        tot["n"] += int(m.sum())
    n = tot["n"]
    if n == 0:
        return {"delta_loss": None, "kl": None, "ce_clean": None, "ce_spliced": None,
                "n_lm_tokens": 0}
    return {"delta_loss": (tot["ce_spliced"] - tot["ce_clean"]) / n, "kl": tot["kl"] / n,
            "ce_clean": tot["ce_clean"] / n, "ce_spliced": tot["ce_spliced"] / n,
            "n_lm_tokens": n}


def evaluate(sae: Any, cfg: Any, sources: list[str] | None = None,
             models: dict[str, Any] | None = None,
             caches: list[Any] | None = None) -> dict[str, dict[str, Any]]:
    """{source: metrics} for every source of the config's caches (or `sources`).

    `caches` replaces the config's cache files (a live run's in-RAM `MemoryCache`, whose
    rows are all held out)."""
    from saediff.cache.format import open_cache
    from saediff.cache.store import split_rows
    from saediff.models import ROLE_SPECIAL, ROLES, load_model, role_codes

    codes = role_codes(cfg.roles) if cfg.roles else [v for v in ROLES.values() if v != ROLE_SPECIAL]
    caches = caches or [open_cache(p, getattr(cfg, "allow_partial", False),
                                   layer=getattr(cfg, "layer", None)) for p in cfg.cache]
    out: dict[str, dict[str, Any]] = {}
    try:
        todo = sources or list(dict.fromkeys(s for c in caches for s in c.sources))
        for src in todo:
            cache = next(c for c in caches if src in c.sources)
            all_held = getattr(cache, "held_out", False)
            held = (0, cache.rows) if all_held else split_rows(cache, cfg.eval_fraction)[1]
            res = activation_evals(sae, cache, src, held, codes, cfg.eval_rows)
            res.update({"delta_loss": None, "kl": None})
            if cfg.eval_sequences > 0:
                n_eval = math.ceil(cache.n_sequences * cfg.eval_fraction)
                s0 = 0 if all_held else cache.n_sequences - n_eval
                seqs = cache.sequences(s0, min(cache.n_sequences, s0 + cfg.eval_sequences))
                spec = cache.attrs.get("models", {}).get(src, {})
                try:
                    lm = (models or {}).get(src) or load_model(
                        spec["name"], spec.get("adapter") or None, device=cfg.device)
                    res.update(spliced_lm_evals(sae, lm, cache.layer, seqs, codes))
                except (OSError, KeyError, ValueError) as exc:
                    log.warning("spliced-LM eval skipped for %s: %s", src, exc)
                    res["lm_error"] = str(exc)
            out[src] = res
    finally:
        for c in caches:
            c.close()
    fvus = [r["fvu"] for r in out.values() if r["fvu"] == r["fvu"]]
    best = min(fvus) if fvus else math.nan
    for src, r in out.items():
        r["fvu_rel"] = r["fvu"] / best if best and best > 0 else None
        if r["fvu_rel"] is not None and r["fvu_rel"] > 1.5:
            log.warning("SAE reconstructs %s %.1fx worse than the best source (FVU %.3f vs "
                        "%.3f): latent shifts between models will partly be reconstruction "
                        "error", src, r["fvu_rel"], r["fvu"], best)
    return out


def write_evals(run_dir: str | Path, cfg: Any, models: dict[str, Any] | None = None,
                caches: list[Any] | None = None) -> Path:
    from saediff.sae import load_sae

    run_dir = Path(run_dir)
    sae = load_sae(run_dir, device=cfg.device)
    res = evaluate(sae, cfg, models=models, caches=caches)
    path = run_dir / "evals.json"
    write_json(path, res)
    for src, r in res.items():
        log.info("%s: FVU %.4f  L0 %.1f  dead %.3f  dense %.3f  dLoss %s  KL %s", src, r["fvu"],
                 r["l0"], r["dead_frac"], r["dense_frac"], _fmt(r["delta_loss"]), _fmt(r["kl"]))
    return path


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"
