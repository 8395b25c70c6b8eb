"""A run directory's files: the trained SAE in SAELens's format (input scale folded in), and
its metrics log cut back to a resumed checkpoint's step."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from saediff.io import staged_outputs, write_text


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics.jsonl lines past `step` (a resumed run writes them again)."""
    if not path.is_file():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
    write_text(path, "".join(ln + "\n" for ln in keep))


def save_final(trainer: Any, run_dir: Path) -> None:
    """Fold the input scale into a copy of the SAE and save it in SAELens's format."""
    import copy

    sae = copy.deepcopy(trainer.sae).cpu()
    for p in sae.parameters():   # the sparse step stores W_enc transposed; files need contiguous
        p.data = p.data.contiguous()
    scale = trainer.activation_scaler.scaling_factor
    if scale is not None:
        sae.fold_activation_norm_scaling_factor(scale)
    sae.cfg.metadata.saediff_input_scale = scale
    sae.cfg.metadata.saediff_steps = trainer.n_training_steps
    sae.cfg.metadata.saediff_tokens = trainer.n_training_samples
    # staged: cfg.json and the weights land together (never one from an older run)
    with staged_outputs(run_dir, (), "saediff train") as stage:
        sae.save_inference_model(stage)
