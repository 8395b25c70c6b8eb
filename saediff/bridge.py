"""TransformerLens's `TransformerBridge` as an input to the cache and the differ.

A bridge wraps a HF model (`bridge.original_model`) and runs its modules, so saediff's HF hooks
on that model read the same activations; `as_loaded_model` unwraps it.
"""
from __future__ import annotations

from typing import Any

from saediff.errors import SaediffError
from saediff.models import LoadedModel


def as_loaded_model(model: Any, name: str | None = None) -> LoadedModel:
    """`model` as a LoadedModel: itself, or a TransformerLens `TransformerBridge` unwrapped to
    the HF model and tokenizer it runs (same modules, so the same activations).

    A `HookedTransformer` holds converted weights, not a HF model: refused with the fix.
    """
    if isinstance(model, LoadedModel):
        return model
    original = getattr(type(model), "original_model", None)
    if original is not None and getattr(model, "tokenizer", None) is not None:
        hf = model.original_model
        label = name or getattr(getattr(hf, "config", None), "_name_or_path", "") or "bridge"
        return LoadedModel(hf, model.tokenizer, str(label))
    if hasattr(model, "hook_dict") and hasattr(model, "cfg"):
        raise SaediffError(f"a {type(model).__name__} cannot feed the cache or the differ (its "
                           "weights are converted, not a HF model): load the checkpoint with "
                           "TransformerBridge.boot_transformers or saediff.load_model")
    raise SaediffError(f"expected a saediff LoadedModel or a TransformerBridge, got "
                       f"{type(model).__name__}")
