"""Stage 2 — train: SAELens SAEs on a cache, from a YAML config (no language model needed).

`loop` is the one training loop (config, sweep, checkpoints, resume) for every dictionary,
`registry` its trainer interface and which trainer trains which architecture, `trainer` the
SAELens trainer with saediff's checkpointing, `crosscoder_trainer` the crosscoder's, `sparse`
the sparse TopK step, `evals` FVU / L0 / spliced-LM loss.

The exports load on first use (sae_lens, torch): `import saediff` stays cheap.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"TrainConfig": "saediff.train.loop", "build_sae": "saediff.train.loop",
            "train": "saediff.train.loop"}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'saediff.train' has no attribute {name!r}")


__all__ = list(_EXPORTS)
