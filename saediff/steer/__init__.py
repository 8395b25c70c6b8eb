"""Stage 4 — steer: clamp / add / ablate a latent or direction during generation.

`hooks` holds `steer` (the context manager, also `saediff.steer`), `evaluate` generates + judges
under steering (`run_steer`, through `saediff.judged`), `sweep` scans coefficients, `reroute`
checks whether a clamped latent's shift moves to other latents.

The exports load on first use (torch): `import saediff` stays cheap.
"""
from __future__ import annotations

from saediff.lazy import lazy_getattr

_EXPORTS = {"steer": "saediff.steer.hooks", "run_steer": "saediff.steer.evaluate",
            "SteerConfig": "saediff.steer.evaluate"}


__getattr__ = lazy_getattr(__name__, _EXPORTS)


__all__ = list(_EXPORTS)
