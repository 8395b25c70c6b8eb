"""What SAE training reads: cache validation, the shuffled stores, the normalisation factor."""
from __future__ import annotations

import logging
from typing import Any

import torch

from saediff.errors import SaediffError

log = logging.getLogger(__name__)

PAIRED = {"crosscoder"}
"""Architectures that read (base, fine-tuned) pairs of the same token, [B, 2, d] batches."""


def open_store(cfg: Any, split: str = "train", sources: dict[str, float] | None = None,
               batch_size: int | None = None, seed: int | None = None,
               device: str | None = None) -> Any:
    """The config's training (or eval) store; batches land on `device` (default cfg.device)."""
    from saediff.cache.format import open_cache
    from saediff.cache.store import ActivationStore, PairedStore

    device = device or cfg.device
    # opened here at the config's layer (a multi-layer cache holds several); the store closes them
    caches = [open_cache(p, cfg.allow_partial, layer=getattr(cfg, "layer", None)) for p in cfg.cache]

    if cfg.input == "difference" or cfg.architecture in PAIRED:
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


def open_training_data(cfg: Any, world: Any, store: Any = None
                       ) -> tuple[Any, dict[str, Any], dict[str, Any] | None]:
    """(store, info, models): `store` as given, the live source, or the config's caches.

    `info` is `check_caches`'s description; `models` the loaded models of a live run."""
    if store is not None:
        return store, {"d_model": store.d_model, "layer": getattr(store, "layer", -1),
                       "hook_name": getattr(store, "hook_name", ""), "models": {},
                       "sources": []}, None
    if cfg.live:
        store, info, models = open_live(cfg, world)  # every bad input refused before a batch
        if cfg.d_in is not None and info["d_model"] != cfg.d_in:
            store.close()
            raise SaediffError(f"d_in mismatch: the model has d_model {info['d_model']}, "
                               f"expected {cfg.d_in}")
        return store, info, models
    info = check_caches(cfg, cfg.d_in)
    if cfg.architecture in PAIRED and not {"base", "finetuned"} <= set(info["sources"]):
        raise SaediffError(f"a {cfg.architecture} needs a paired cache with sources base and "
                           f"finetuned; {cfg.cache} has {info['sources']}")
    # host batches: `dp.local` slices this rank's share before the (pinned) device copy
    return open_store(cfg, device="cpu"), info, None


def check_caches(cfg: Any, d_in: int | None = None) -> dict[str, Any]:
    """Validate caches against the config; returns {d_model, layer, hook_name, models}."""
    from saediff.cache.format import open_cache
    from saediff.models import role_codes

    infos = []
    for path in cfg.cache:
        with open_cache(path, cfg.allow_partial, layer=getattr(cfg, "layer", None)) as c:
            infos.append((str(path), c.d_model, c.layer, c.hook_name, c.sources,
                          c.attrs.get("models", {})))
    for path, d, _layer, _, _srcs, _ in infos:
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
def estimate_scale(cfg: Any, store: Any, d_in: int,
                   batches: list[torch.Tensor] | None = None) -> float:
    """sqrt(d_in) / mean row norm over `norm_batches` batches (of a separate store, or the
    given `batches`: one layer of a multi-layer live store's `peek_layers`)."""
    if batches is None and hasattr(store, "peek_batches"):
        batches = store.peek_batches(cfg.norm_batches)
    elif batches is None:
        probe = open_store(cfg, seed=cfg.seed + 7919)
        batches = [next(probe) for _ in range(cfg.norm_batches)]
        probe.close()
    mean = torch.cat([b.norm(dim=-1).flatten() for b in batches]).mean().double()
    if getattr(store, "rank_local", False):  # each rank saw its own rows: average the means
        import torch.distributed as tdist

        tdist.all_reduce(mean)
        mean /= tdist.get_world_size()
    return float(d_in ** 0.5 / mean.item())


# --- live: activations straight from the model(s) ------------------------------------------------

def check_data_source(cfg: Any) -> None:
    """A TrainConfig reads caches, or runs models (`--live`), not both; what --live needs."""
    if not cfg.live:
        # (--layer alone selects a layer of a multi-layer cache)
        given = [f"--{n.replace('_', '-')}" for n in ("base", "dataset", "finetuned")
                 if getattr(cfg, n) is not None]
        if given:
            raise SaediffError(f"{', '.join(given)} name(s) a model to run: add --live to "
                               "train straight from it, or train on a cache (--cache)")
        if cfg.cache is not None and not cfg.cache:
            raise SaediffError("cache: give at least one cache file")
        return
    if cfg.cache is not None:
        raise SaediffError("--live trains straight from the models: drop --cache (or drop "
                           "--live to train on the cache)")
    if getattr(cfg, "layers", None):
        check_live_layers(cfg)
    cfg.require_source("TrainConfig --live", need_layer=not getattr(cfg, "layers", None))
    if cfg.buffer_tokens is not None and cfg.buffer_tokens < cfg.batch_size:
        raise SaediffError(f"--buffer-tokens {cfg.buffer_tokens} is smaller than one batch "
                           f"(--batch-size {cfg.batch_size}); raise it")
    if cfg.lm_batch_size < 1:
        raise SaediffError(f"lm_batch_size must be >= 1, got {cfg.lm_batch_size}")
    what = f"a {cfg.architecture}" if cfg.architecture in PAIRED else "--input difference"
    if (cfg.architecture in PAIRED or cfg.input == "difference") \
            and not cfg.finetuned:
        raise SaediffError(f"{what} needs two models: pass --finetuned or "
                           "--finetuned-adapter")
    if cfg.allow_partial:
        raise SaediffError("--allow-partial is about caches; drop it with --live")


def check_live_layers(cfg: Any) -> None:
    """--live --layers: a readable list, not with --layer, in range (no weights loaded)."""
    from saediff.layerspec import check_layer_range, config_n_layers, parse_layers

    layers = parse_layers(cfg.layers)
    if cfg.layer is not None:
        raise SaediffError(f"give --layer or --layers, not both (--layer {cfg.layer}, "
                           f"--layers {cfg.layers})")
    for name in (cfg.base, cfg.finetuned):
        if name:  # from config.json alone: a bad layer fails before any weights load
            check_layer_range(layers, config_n_layers(name), name)


def live_layers(cfg: Any) -> list[int]:
    """The layers a live config reads from one forward: --layers, or [--layer]."""
    from saediff.layerspec import parse_layers

    return parse_layers(cfg.layers) if getattr(cfg, "layers", None) else [cfg.layer]


def live_mode(cfg: Any) -> str:
    """What the live buffer holds: pairs (crosscoder), differences, or per-source rows."""
    if cfg.architecture in PAIRED:
        return "pair"
    return "diff" if cfg.input == "difference" else "activations"


def check_live_documents(cfg: Any) -> None:
    """The dataset opens and its first document has the configured fields (no model yet)."""
    from saediff.cache.documents import iter_documents

    doc = next(iter_documents(cfg.dataset, cfg.split), None)
    if doc is None:
        raise SaediffError(f"dataset {cfg.dataset} yielded no documents")
    fields = [cfg.prompt_field, cfg.response_field] if cfg.chat else [cfg.text_field]
    missing = [f for f in fields if f and f not in doc]
    if missing:
        raise SaediffError(f"dataset {cfg.dataset}: document 0 has no field {missing[0]!r} "
                           f"(fields: {sorted(doc)}); pass --text-field or --prompt-field")


def live_rows(cfg: Any, models: dict[str, Any], shard: tuple[int, int] = (0, 1),
              split: str = "train") -> Any:
    """The `ModelRows` stream of a live config (this rank's documents of `split`)."""
    from saediff.cache.live import ModelRows
    from saediff.models import ROLE_SPECIAL, ROLES, role_codes

    codes = role_codes(cfg.roles) if cfg.roles else [v for v in ROLES.values() if v != ROLE_SPECIAL]
    mode = live_mode(cfg)
    weights = cfg.sources if mode == "activations" else {"base": 1.0, "finetuned": 1.0}
    if split == "eval":  # the evals read every source of every role
        mode, weights, codes = "activations", {k: 1.0 for k in models}, sorted(ROLES.values())
    return ModelRows(cfg, models, live_layers(cfg), mode, weights, codes, cfg.lm_batch_size,
                     cfg.eval_fraction, cfg.seed, shard=shard, split=split,
                     dtype=getattr(torch, cfg.dtype))


def open_live(cfg: Any, world: Any) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """(LiveStore, info like `check_caches`'s, loaded models) for a `--live` config.

    Every bad input (dataset, fields, layer, tokenizers, buffer size) is refused here, before
    any model runs a batch. Under torchrun each rank reads its share of the documents.
    """
    from saediff.cache.live import LiveStore, default_buffer_rows
    from saediff.cache.source import load_source_models

    check_live_documents(cfg)
    models = load_source_models(cfg)
    if getattr(cfg, "layers", None):  # --layer is checked by load_source_models
        from saediff.layerspec import check_layer_range

        for m in models.values():
            check_layer_range(live_layers(cfg), m.n_layers, m.name)
    shard = (world.rank, world.world_size) if world.active else (0, 1)
    rows = live_rows(cfg, models, shard)
    next(rows.sequences())  # tokenises document 0: a bad field or template fails here
    buffer = cfg.buffer_tokens or default_buffer_rows(rows.row_shape, rows.dtype)
    store = LiveStore(rows, cfg.batch_size // world.world_size, buffer, cfg.seed,
                      rank_local=world.active)
    layer = cfg.layer if cfg.layer is not None else live_layers(cfg)  # a list for --layers
    info = {"d_model": rows.d_model, "layer": layer, "hook_name": store.hook_name,
            "models": {k: m.provenance() for k, m in models.items()}, "sources": list(models)}
    log.info("live: %s, buffer %d rows (%s)", ", ".join(f"{k}={m.name}" for k, m in models.items()),
             buffer, cfg.dtype)
    return store, info, models


def live_eval_cache(cfg: Any, models: dict[str, Any]) -> Any:
    """The held-out documents of a live config in RAM (`MemoryCache`), for the evals."""
    from saediff.cache.live_eval import MemoryCache
    from saediff.models import ROLE_SPECIAL, ROLES, role_codes

    codes = role_codes(cfg.roles) if cfg.roles else [v for v in ROLES.values() if v != ROLE_SPECIAL]
    return MemoryCache(live_rows(cfg, models, split="eval"), models, codes, cfg.eval_rows,
                       cfg.eval_sequences)
