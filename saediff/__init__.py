"""saediff: sparse-autoencoder model diffing for emergent-misalignment research.

Pipeline: cache (activations to HDF5) -> train (SAELens SAEs) -> diff (rank latents by
shift between base and fine-tuned) -> steer (clamp / add / ablate during generation).
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
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
    "organism_path": "saediff.organism",
}


# Modules that moved when the package was split into one subpackage per stage: the old paths
# keep importing (with a DeprecationWarning) until 0.3.
_MOVED = {
    "saediff.cachefile": "saediff.cache.format", "saediff.store": "saediff.cache.store",
    "saediff.trainer": "saediff.train.trainer", "saediff.sparse": "saediff.train.sparse",
    "saediff.sae_evals": "saediff.train.evals", "saediff.plots": "saediff.train.plots",
    "saediff.diffdata": "saediff.diff.data", "saediff.evidence": "saediff.diff.evidence",
    "saediff.directions": "saediff.diff.directions", "saediff.report": "saediff.diff.report",
    "saediff.steer_eval": "saediff.steer.evaluate", "saediff.sweep": "saediff.steer.sweep",
}


class _MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        return importlib.util.spec_from_loader(fullname, self) if fullname in _MOVED else None

    def create_module(self, spec: Any) -> Any:
        new = _MOVED[spec.name]
        warnings.warn(f"{spec.name} moved to {new}; import it from there", DeprecationWarning,
                      stacklevel=3)
        return importlib.import_module(new)

    def exec_module(self, module: Any) -> None:
        pass


sys.meta_path.append(_MovedFinder())


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'saediff' has no attribute {name!r}")


__all__ = list(_EXPORTS) + ["__version__"]
