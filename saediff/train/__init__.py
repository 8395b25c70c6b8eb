"""Stage 2 — train: SAELens SAEs on a cache, from a YAML config (no language model needed).

`loop` is the training loop (config, sweep, checkpoints, resume), `trainer` the SAELens trainer
with saediff's checkpointing, `sparse` the sparse TopK step, `evals` FVU / L0 / spliced-LM loss.
"""
from saediff.train.loop import TrainConfig, build_sae, train

__all__ = ["TrainConfig", "build_sae", "train"]
