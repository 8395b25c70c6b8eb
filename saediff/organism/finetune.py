"""The one language-model optimisation loop of both organisms (toy base pretraining, every LoRA
fine-tune of the toy and of the real SmolLM2 organism).

AdamW with gradient clipping at 1.0; the caller gives the batches, the learning rate per step
and, optionally, the loss (default: the model's own next-token loss on `labels`).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""(input_ids, attention_mask, labels with -100 on positions without loss)."""


def optimise(model: Any, batches: Iterable[Batch], lr_at: Callable[[int], float], *,
             weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
             loss_fn: Callable[[Any, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
             | None = None, what: str = "", log_every: int = 100,
             on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """Train the parameters of `model` that require grad on `batches`; returns the per-step
    losses. The model is left in eval mode.

    `on_step(step, loss)` runs after each optimiser step, with the model in eval mode (back in
    train mode afterwards): checkpointing and measuring during a run (saediff.experiments)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr_at(0), weight_decay=weight_decay, betas=betas)
    losses: list[float] = []
    model.train()
    try:
        for step, (ids, att, labels) in enumerate(batches):
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            if loss_fn is None:
                loss = model(input_ids=ids, attention_mask=att, labels=labels, use_cache=False).loss
            else:
                loss = loss_fn(model, ids, att, labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            losses.append(loss.item())
            if step % log_every == 0:
                log.info("%s step %d loss %.3f", what, step + 1, losses[-1])
            if on_step is not None:
                model.eval()
                on_step(step, losses[-1])
                model.train()
    finally:
        model.eval()
    return losses


def save_adapter(model: Any, out: str | Path, base: str) -> None:
    """Save a PEFT adapter naming its base for a reader (`base`), not the temporary directory
    the base was loaded from: the adapters ship, and are applied to a base the user loads."""
    for cfg in model.peft_config.values():
        cfg.base_model_name_or_path = base
    model.save_pretrained(out, safe_serialization=True)
