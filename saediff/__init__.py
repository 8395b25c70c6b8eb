"""saediff: sparse-autoencoder model diffing for emergent-misalignment research.

Pipeline: cache (activations to HDF5) -> train (SAELens SAEs) -> diff (rank latents by
shift between base and fine-tuned) -> steer (clamp / add / ablate during generation).

    import saediff
    saediff.cache(saediff.CacheConfig(base=..., layer=L, out="acts.h5"))
    saediff.train(saediff.TrainConfig(cache="acts.h5", out="runs/sae"))
    res = saediff.run_diff(saediff.DiffConfig(base=..., finetuned=[...], sae="runs/sae", ...))
    with saediff.steer(lm, sae, latent=j, clamp=0.0): ...
    saediff.run_steer(saediff.SteerConfig(...))

`cache`, `train` and `steer` are also the names of their stage subpackages: the subpackages are
imported here first (their `__init__`s are light), then the names are bound to the entry points,
so `saediff.steer` is always the function (import a stage's modules with `from saediff.steer
import hooks`, not `import saediff.steer.hooks`). Everything else is exported lazily: importing
saediff loads no torch, transformers or sae_lens until an entry point is called.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from saediff.lazy import lazy_getattr

__version__ = "0.1.0"

for _stage in ("cache", "steer", "train"):  # the subpackages first: see the module docstring
    importlib.import_module(f"saediff.{_stage}")
del _stage

if TYPE_CHECKING:
    from contextlib import AbstractContextManager
    from pathlib import Path

    from saediff.cache import CacheConfig
    from saediff.train import TrainConfig

# name -> module that defines it (the real objects, imported on first access)
_EXPORTS = {
    "run_diff": "saediff.diff.differ",
    "run_steer": "saediff.steer.evaluate",
    "CacheConfig": "saediff.cache",
    "TrainConfig": "saediff.train",
    "DiffConfig": "saediff.diff.data",
    "SteerConfig": "saediff.steer.evaluate",
    "load_model": "saediff.models",
    "load_tokenizer": "saediff.models",
    "open_cache": "saediff.cache.format",
    "ActivationStore": "saediff.cache.store",
    "load_sae": "saediff.sae",
    "SaediffError": "saediff.errors",
    "organism_path": "saediff.organism",
}


def cache(cfg: CacheConfig, **kwargs: Any) -> Path:
    """Stage 1: write the activation cache of `cfg` (`saediff.cache.build_cache`);
    returns its path."""
    from saediff.cache import build_cache

    return build_cache(cfg, **kwargs)


def train(cfg: TrainConfig, **kwargs: Any) -> Any:
    """Stage 2: train the SAE(s) of `cfg` on a cache (`saediff.train.train`)."""
    from saediff.train import train as train_

    return train_(cfg, **kwargs)


def steer(model: Any, sae: Any = None, latent: Any = None, **kwargs: Any
          ) -> AbstractContextManager[None]:
    """Stage 4: a context manager that clamps / adds / ablates during every forward inside it
    (`saediff.steer.hooks.steer`, whose docstring lists the modes); hooks are removed on exit."""
    from saediff.steer.hooks import steer as steer_

    return steer_(model, sae, latent, **kwargs)


__getattr__ = lazy_getattr(__name__, _EXPORTS)


__all__ = ["cache", "train", "steer", *_EXPORTS, "__version__"]
