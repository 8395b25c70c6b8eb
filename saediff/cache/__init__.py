"""Stage 1 — cache: stream one layer's residual activations of one or two models into HDF5.

`writer` builds the file (resumable, crash-safe), `format` defines and reads it
(`open_cache`, `verify_cache`), `store` serves shuffled training batches (`ActivationStore`).

The exports load on first use (h5py, torch): `import saediff` stays cheap.
"""
from __future__ import annotations

from saediff.lazy import lazy_getattr

_EXPORTS = {
    "CacheConfig": "saediff.cache.writer", "build_cache": "saediff.cache.writer",
    "CacheFile": "saediff.cache.format", "open_cache": "saediff.cache.format",
    "verify_cache": "saediff.cache.format", "ActivationStore": "saediff.cache.store",
}


__getattr__ = lazy_getattr(__name__, _EXPORTS)


__all__ = list(_EXPORTS)
