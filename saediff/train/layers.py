"""Training several layers from one multi-layer cache (`saediff train --layers 6,12,18`).

One run per layer, in turn, each into OUT/layer_<L>/ (a plain run directory: its SAE loads
with `saediff.load_sae` and names its own hook, `blocks.<L>.hook_resid_post`). Every run reads
the same token rows in the same order: a store's shuffle depends only on (seed, stream, epoch,
group) and the row index, which the layers of one cache share. Under torchrun each layer's run
is data-parallel over all ranks, exactly as a single-layer run (docs/scale.md says why).
"""
from __future__ import annotations

import dataclasses
from typing import Any

from saediff.errors import SaediffError
from saediff.layerspec import layer_dir, parse_layers


def per_layer_configs(cfg: Any) -> list[Any]:
    """One config per requested layer; every layer checked against every cache up front."""
    from saediff.cache.format import open_cache

    layers = parse_layers(cfg.layers)
    if cfg.layer is not None:
        raise SaediffError(f"give --layer or --layers, not both (--layer {cfg.layer}, "
                           f"--layers {cfg.layers})")
    for path in cfg.cache:
        with open_cache(path, cfg.allow_partial) as c:
            missing = [x for x in layers if x not in c.layers]
        if missing:
            raise SaediffError(f"--layers: {path} holds layer(s) {c.layers}, not "
                               f"{', '.join(map(str, missing))}; cache them with "
                               "`saediff cache --layers ...`")
    return [dataclasses.replace(cfg, layers=None, layer=x, out=str(layer_dir(cfg.out, x)))
            for x in layers]


# --- live: several layers from one forward pass (`saediff train --live --layers 6,12,18`) -------
# The one training loop (`loop._train`) trains groups of trainers: a single-layer run is one
# group keyed None (its store's `next` batch); a live multi-layer run has one group per layer,
# keyed by the layer, each fed its slice of `LiveStore.next_layers()` (one model forward for
# all layers). Every layer's runs live in OUT/layer_<L>/ (own hook name, scale and metadata);
# the checkpoints of all of them, and the store's position, live in OUT/checkpoints/.

def layer_groups(cfg: Any) -> list[tuple[int | None, Any]]:
    """[(key, config)]: [(None, cfg)], or per live layer (L, cfg at layer L, OUT/layer_L)."""
    if not (cfg.live and cfg.layers):
        return [(None, cfg)]
    return [(x, dataclasses.replace(cfg, layers=None, layer=x, out=str(layer_dir(cfg.out, x))))
            for x in parse_layers(cfg.layers)]


def next_batches(store: Any, keys: list[int | None]) -> dict[int | None, Any]:
    """This step's batch per group key (one store read, so one model forward, for all)."""
    if keys == [None]:
        return {None: next(store)}
    return store.next_layers()


def layer_meta(meta: dict[str, Any], key: int | None) -> dict[str, Any]:
    """SAE metadata of a group: its own hook name and layer."""
    if key is None:
        return meta
    return {**meta, "hook_name": f"blocks.{key}.hook_resid_post", "layer": key}


def group_scales(cfg: Any, store: Any, d_in: int, keys: list[int | None],
                 saved: Any) -> dict[int | None, float | None]:
    """Normalisation factor per group: the checkpoint's, or estimated per layer."""
    from saediff.train.data import estimate_scale

    if saved is not None:  # a single run stores one float, a multi-layer run one per layer
        return {None: saved} if keys == [None] else dict(zip(keys, saved))
    if not cfg.normalize:
        return {k: None for k in keys}
    if keys == [None]:
        return {None: estimate_scale(cfg, store, d_in)}
    peeked = store.peek_layers(cfg.norm_batches)  # one pass of the models for every layer
    return {k: estimate_scale(cfg, store, d_in, batches=peeked[k]) for k in keys}


def packed_scales(scales: dict[int | None, float | None], keys: list[int | None]) -> Any:
    """What the checkpoint stores (JSON): one float, or the list in layer order."""
    return scales[None] if keys == [None] else [scales[k] for k in keys]
