"""LoRA weight amplification: run a PEFT model with its adapter scaled by α.

α = 0 is the base model, 1 the fine-tune, α > 1 exaggerates the fine-tune (surfaces rare
fine-tune behaviour), 0 < α < 1 is a cheap interpolation trajectory. The scale lives in each
LoRA layer's `scaling` dict (alpha / r per adapter); it is multiplied on entry and restored
in `finally`, so an exception cannot leave the model amplified.
"""
from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from typing import Any

from saediff.errors import SaediffError
from saediff.judged import GenerationConfig, judged_generation

log = logging.getLogger(__name__)


def _lora_layers(model: Any) -> list[Any]:
    return [m for m in model.modules() if isinstance(getattr(m, "scaling", None), dict)
            and hasattr(m, "lora_A")]


@contextlib.contextmanager
def amplify(lm: Any, alpha: float) -> Iterator[None]:
    """Scale every LoRA layer of `lm` (a LoadedModel or PEFT model) by `alpha` inside the block."""
    if not math.isfinite(alpha):
        raise SaediffError(f"amplify: alpha={alpha!r} is not finite")
    model = getattr(lm, "model", lm)
    layers = _lora_layers(model)
    if not layers:
        raise SaediffError("amplify: the model has no LoRA adapter; load the fine-tune as "
                           "--base + --finetuned-adapter")
    saved = [dict(m.scaling) for m in layers]
    try:
        for m in layers:
            for k in m.scaling:
                m.scaling[k] = m.scaling[k] * alpha
        yield
    finally:
        for m, s in zip(layers, saved):
            m.scaling.clear()
            m.scaling.update(s)


def run_amplification(lm: Any, items: list[dict[str, Any]], alphas: list[float], judge: Any,
                      gen: GenerationConfig) -> list[dict[str, Any]]:
    """EM rate and coherence (Wilson CIs) of the adapter scaled by each α, on `items`."""
    rows = []
    for a in alphas:
        s = judged_generation(lm, items, gen, judge, amplify(lm, a)).summary
        rows.append({"alpha": a, **s.to_dict(per_topic=False)})
        log.info("alpha %.2f: EM %.3f coherent %.3f", a, s.misaligned_given_coherent,
                 s.coherent_rate)
    return rows
