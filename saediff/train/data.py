"""What SAE training reads: cache validation, the shuffled stores, the normalisation factor."""
from __future__ import annotations

from typing import Any

import torch

from saediff.errors import SaediffError


def open_store(cfg: Any, split: str = "train", sources: dict[str, float] | None = None,
               batch_size: int | None = None, seed: int | None = None,
               device: str | None = None) -> Any:
    """The config's training (or eval) store; batches land on `device` (default cfg.device)."""
    from saediff.cache.format import open_cache
    from saediff.cache.store import ActivationStore, PairedStore

    device = device or cfg.device
    # opened here at the config's layer (a multi-layer cache holds several); the store closes them
    caches = [open_cache(p, cfg.allow_partial, layer=getattr(cfg, "layer", None)) for p in cfg.cache]

    if cfg.input == "difference" or cfg.architecture == "crosscoder":
        return PairedStore(caches, mode="diff" if cfg.input == "difference" else "pair",
                           roles=cfg.roles, batch_size=batch_size or cfg.batch_size,
                           seed=cfg.seed if seed is None else seed,
                           buffer_rows=cfg.buffer_rows, split=split,
                           eval_fraction=cfg.eval_fraction, device=device,
                           allow_partial=cfg.allow_partial)

    return ActivationStore(caches, sources=sources or cfg.sources, roles=cfg.roles,
                           batch_size=batch_size or cfg.batch_size,
                           seed=cfg.seed if seed is None else seed, buffer_rows=cfg.buffer_rows,
                           split=split, eval_fraction=cfg.eval_fraction, device=device,
                           allow_partial=cfg.allow_partial)


def check_caches(cfg: Any, d_in: int | None = None) -> dict[str, Any]:
    """Validate caches against the config; returns {d_model, layer, hook_name, models}."""
    from saediff.cache.format import open_cache
    from saediff.models import role_codes

    infos = []
    for path in cfg.cache:
        with open_cache(path, cfg.allow_partial, layer=getattr(cfg, "layer", None)) as c:
            infos.append((str(path), c.d_model, c.layer, c.hook_name, c.sources,
                          c.attrs.get("models", {})))
    for path, d, layer, _, srcs, _ in infos:
        if d_in is not None and d != d_in:
            raise SaediffError(f"d_in mismatch: {path} holds d_model {d}, expected {d_in}")
    if len({i[1] for i in infos}) > 1:
        raise SaediffError(f"caches disagree on d_model: {[(i[0], i[1]) for i in infos]}")
    if len({i[2] for i in infos}) > 1:
        raise SaediffError(f"caches disagree on layer: {[(i[0], i[2]) for i in infos]}")
    have = sorted({s for i in infos for s in i[4]})
    missing = [s for s in cfg.sources if s not in have]
    if missing:
        raise SaediffError(f"source(s) {missing} not in cache(s) {cfg.cache} "
                           f"(available sources: {have})")
    if cfg.roles:
        role_codes(cfg.roles)
    models: dict[str, Any] = {}
    for i in infos:
        models.update(i[5])
    return {"d_model": infos[0][1], "layer": infos[0][2], "hook_name": infos[0][3],
            "models": models, "sources": have}


@torch.no_grad()
def estimate_scale(cfg: Any, store: Any, d_in: int) -> float:
    """sqrt(d_in) / mean row norm over `norm_batches` batches (of a separate store)."""
    if hasattr(store, "peek_batches"):
        batches = store.peek_batches(cfg.norm_batches)
    else:
        probe = open_store(cfg, seed=cfg.seed + 7919)
        batches = [next(probe) for _ in range(cfg.norm_batches)]
        probe.close()
    norms = torch.cat([b.norm(dim=-1) for b in batches])
    return float(d_in ** 0.5 / norms.mean().item())
