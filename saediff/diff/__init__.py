"""Stage 3 — diff: rank SAE latents by activation shift between base and fine-tuned models.

`data` turns prompts into token sets (`DiffConfig`), `differ` measures and ranks latents,
`directions` compares mean-diff / LoRA-B / decoder directions, `evidence` gathers top contexts,
`report` renders the HTML report.
"""
from saediff.diff.data import DiffConfig
from saediff.diff.differ import DiffResult, rank_latents, run_diff

__all__ = ["DiffConfig", "DiffResult", "rank_latents", "run_diff"]
