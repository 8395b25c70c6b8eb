"""Stage 4 — steer: clamp / add / ablate a latent or direction during generation.

`hooks` holds `steer` (the context manager, also `saediff.steer`), `evaluate` generates + judges
under steering (`run_steer`, through `saediff.judged`), `sweep` scans coefficients, `reroute`
checks whether a clamped latent's shift moves to other latents.

The exports load on first use (torch): `import saediff` stays cheap.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"steer": "saediff.steer.hooks", "run_steer": "saediff.steer.evaluate",
            "SteerConfig": "saediff.steer.evaluate"}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'saediff.steer' has no attribute {name!r}")


__all__ = list(_EXPORTS)
