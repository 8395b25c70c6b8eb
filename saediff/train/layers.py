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
