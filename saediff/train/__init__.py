"""Stage 2 — train: SAELens SAEs on a cache, from a YAML config (no language model needed).

`loop` is the one training loop (config, sweep, checkpoints, resume) for every dictionary,
`registry` its trainer interface and which trainer trains which architecture, `trainer` the
SAELens trainer with saediff's checkpointing, `crosscoder_trainer` the crosscoder's, `sparse`
the sparse TopK step, `evals` FVU / L0 / spliced-LM loss.

The exports load on first use (sae_lens, torch): `import saediff` stays cheap.
"""
from __future__ import annotations

from saediff.lazy import lazy_getattr

_EXPORTS = {"TrainConfig": "saediff.train.config", "build_sae": "saediff.train.loop",
            "train": "saediff.train.loop"}


__getattr__ = lazy_getattr(__name__, _EXPORTS)


__all__ = list(_EXPORTS)
