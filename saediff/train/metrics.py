"""The one metrics row a training step writes to metrics.jsonl (every dictionary trainer)."""
from __future__ import annotations

from typing import Any

import torch


@torch.no_grad()
def step_metrics(trainer: Any, out: dict[str, Any], step: int) -> dict[str, Any]:
    """One metrics.jsonl row from a training step's outputs (`DictionaryTrainer.metrics` of
    every trainer): loss parts, L0, the batch's fraction of variance unexplained, dead share."""
    x, x_hat = out["sae_in"], out["sae_out"]
    den = (x - x.mean(0)).pow(2).sum().item()
    return {"step": step, "tokens": trainer.n_training_samples,
            "loss": float(out["loss"]), "mse_loss": float(out["mse_loss"]),
            "aux_loss": float(out["aux_loss"]), "l0": float(out["l0"]),
            "fvu_batch": (x - x_hat).pow(2).sum().item() / den if den else None,
            "dead_frac": trainer.dead_neurons.float().mean().item(),
            "lr": trainer.optimizer.param_groups[0]["lr"]}
