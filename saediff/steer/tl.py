"""TransformerLens models as steering targets: `HookedTransformer` and `TransformerBridge`.

Both expose TransformerLens hook points (`model.hook_dict`); steering edits the residual stream
at `blocks.L.hook_resid_post` (the tensor an SAE with hook_name `blocks.L.hook_resid_post` or
`blocks.L+1.hook_resid_pre` reads) with the same edit functions as for HF models, so clamp /
add / ablate and the error term behave identically. `HookedTransformer.generate` calls
`self.forward` directly (module pre-hooks never fire), so `positions="generated"` watches the
forward by wrapping it for the duration of the block; the wrapper is always removed.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from saediff.errors import SaediffError


def is_transformer_lens(model: Any) -> bool:
    """A TransformerLens model (HookedTransformer, HookedSAETransformer, TransformerBridge)."""
    cfg = getattr(model, "cfg", None)
    return (isinstance(model, nn.Module) and isinstance(getattr(model, "hook_dict", None), dict)
            and hasattr(cfg, "d_model") and hasattr(cfg, "n_layers"))


class ResidSites:
    """`blocks.L.hook_resid_post` hook points, indexable by L like a list of decoder blocks."""

    def __init__(self, model: nn.Module):
        self.hooks = model.hook_dict  # type: ignore[attr-defined]
        self.n = int(model.cfg.n_layers)  # type: ignore[attr-defined]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, layer: int) -> nn.Module:
        name = f"blocks.{layer}.hook_resid_post"
        if name not in self.hooks:
            raise SaediffError(f"the TransformerLens model has no hook point {name}")
        return self.hooks[name]


def resolve_tl(model: nn.Module) -> tuple[nn.Module, ResidSites, int]:
    """(model, its resid_post hook points, d_model), as `hooks._resolve` returns for HF."""
    return model, ResidSites(model), int(model.cfg.d_model)  # type: ignore[attr-defined]


class _Past:
    """What the position tracker reads from a KV cache: its length."""

    def __init__(self, n: int):
        self.n = n

    def get_seq_length(self) -> int:
        return self.n


def _tl_past(cache: Any) -> int:
    entries = getattr(cache, "entries", None)
    if entries:  # HookedTransformer's TransformerLensKeyValueCache: [batch, pos, heads, d_head]
        return int(entries[0].past_keys.shape[1])
    if hasattr(cache, "get_seq_length"):  # the bridge passes HF caches through
        return int(cache.get_seq_length())
    return 0


class ForwardWatch:
    """Calls `pre_hook(model, args, kwargs)` before every `model.forward`; `.remove()` undoes it.

    The KV cache arrives as `past_kv_cache` (HookedTransformer) or `past_key_values` (bridge);
    the tracker sees it as `past_key_values` with `use_cache` saying whether one is in use, so
    a cacheless generate (the whole sequence each step) is followed as for HF models.
    """

    def __init__(self, model: nn.Module, pre_hook: Callable[..., None]):
        self.model, self.had = model, "forward" in vars(model)
        inner = model.forward

        def forward(*args: Any, **kwargs: Any) -> Any:
            cache = kwargs.get("past_kv_cache", kwargs.get("past_key_values"))
            x = kwargs.get("input", kwargs.get("tokens", args[0] if args else None))
            if x is not None and hasattr(x, "shape") and x.dim() >= 2:
                pre_hook(model, (x,), {"past_key_values": None if cache is None
                                       else _Past(_tl_past(cache)),
                                       "use_cache": cache is not None})
            return inner(*args, **kwargs)

        self.inner = inner
        model.forward = forward  # type: ignore[method-assign]

    def remove(self) -> None:
        if self.had:
            self.model.forward = self.inner  # type: ignore[method-assign]
        else:
            vars(self.model).pop("forward", None)
