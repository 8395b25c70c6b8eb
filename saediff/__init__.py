"""saediff: sparse-autoencoder model diffing for emergent-misalignment research.

Pipeline: cache (activations to HDF5) -> train (SAELens SAEs) -> diff (rank latents by
shift between base and fine-tuned) -> steer (clamp / add / ablate during generation).
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Lazy exports keep `import saediff` (and the CLI's start) cheap.
_EXPORTS = {
    "load_model": "saediff.models",
    "load_tokenizer": "saediff.models",
    "open_cache": "saediff.cache.format",
    "ActivationStore": "saediff.cache.store",
    "load_sae": "saediff.sae",
    "steer": "saediff.steer",
    "SaediffError": "saediff.errors",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'saediff' has no attribute {name!r}")


__all__ = list(_EXPORTS) + ["__version__"]
