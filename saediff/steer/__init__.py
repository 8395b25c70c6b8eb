"""Stage 4 — steer: clamp / add / ablate a latent or direction during generation.

`hooks` holds `steer` (the context manager), `evaluate` generates + judges under steering
(`run_steer`), `sweep` scans coefficients and runs the causal checks.

`saediff.steer(...)` calls the context manager: the package itself is callable.
"""
import sys
import types
from typing import Any

from saediff.steer.hooks import steer


class _CallableModule(types.ModuleType):
    # `import saediff.steer` binds the package to the attribute `saediff.steer`; keep
    # `saediff.steer(lm, sae, ...)` working by making the package callable.
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return steer(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

__all__ = ["steer"]
