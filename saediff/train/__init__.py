"""Stage 2 — train: SAELens SAEs on a cache, from a YAML config (no language model needed).

`loop` is the one training loop (config, sweep, checkpoints, resume) for every dictionary,
`registry` its trainer interface and which trainer trains which architecture, `trainer` the
SAELens trainer with saediff's checkpointing, `crosscoder_trainer` the crosscoder's, `sparse`
the sparse TopK step, `evals` FVU / L0 / spliced-LM loss.
"""
from saediff.train.loop import TrainConfig, build_sae, train

__all__ = ["TrainConfig", "build_sae", "train"]
