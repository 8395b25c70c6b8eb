"""Stage 1 — cache: stream one layer's residual activations of one or two models into HDF5.

`writer` builds the file (resumable, crash-safe), `format` defines and reads it
(`open_cache`, `verify_cache`), `store` serves shuffled training batches (`ActivationStore`).
"""
from saediff.cache.format import CacheFile, open_cache, verify_cache
from saediff.cache.store import ActivationStore
from saediff.cache.writer import CacheConfig, build_cache

__all__ = ["CacheConfig", "build_cache", "CacheFile", "open_cache", "verify_cache", "ActivationStore"]
