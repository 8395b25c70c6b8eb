"""Residual-stream capture: forward hooks on a decoder block's output (HF
`hidden_states[layer+1]`), optionally cutting the forward right after the deepest block needed.
Every hook is removed, also on exceptions."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from saediff.errors import SaediffError

# `lm` below is a `saediff.models.LoadedModel` (not imported: models re-exports this module)
LoadedModel = Any


class _StopForward(Exception):
    pass


@contextlib.contextmanager
def capture_residual(lm: LoadedModel, layer: int, stop: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Capture the residual stream after block `layer` (HF `hidden_states[layer+1]`).

    With `stop=True` the forward is cut right after the block (use `run_to_layer`).
    The hook is always removed.
    """
    lm.check_layer(layer)
    box: dict[str, torch.Tensor] = {}

    def hook(_mod: nn.Module, _inp: Any, out: Any) -> None:
        box["resid"] = out[0] if isinstance(out, tuple) else out
        if stop:
            raise _StopForward

    handle = lm.layers[layer].register_forward_hook(hook)
    try:
        yield box
    finally:
        handle.remove()


@torch.no_grad()
def run_to_layer(lm: LoadedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 layer: int) -> torch.Tensor:
    """Residual stream after block `layer`, running only blocks 0..layer. [B, T, d_model]."""
    with capture_residual(lm, layer, stop=True) as box:
        try:
            lm.model(input_ids=input_ids.to(lm.device), attention_mask=attention_mask.to(lm.device),
                     use_cache=False)
        except _StopForward:
            pass
    if "resid" not in box:
        raise SaediffError(f"block {layer} of {lm.name} did not run")
    return box["resid"]


@torch.no_grad()
def run_to_layers(lm: LoadedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  layers: list[int]) -> dict[int, torch.Tensor]:
    """Residual stream after each block in `layers` from ONE forward pass, cut after the
    deepest of them. {layer: [B, T, d_model]}; every hook is removed."""
    for layer in layers:
        lm.check_layer(layer)
    last = max(layers)
    box: dict[int, torch.Tensor] = {}

    def make_hook(layer: int) -> Any:
        def hook(_mod: nn.Module, _inp: Any, out: Any) -> None:
            box[layer] = out[0] if isinstance(out, tuple) else out
            if layer == last:
                raise _StopForward
        return hook

    handles = [lm.layers[layer].register_forward_hook(make_hook(layer)) for layer in set(layers)]
    try:
        lm.model(input_ids=input_ids.to(lm.device), attention_mask=attention_mask.to(lm.device),
                 use_cache=False)
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    missing = [x for x in layers if x not in box]
    if missing:
        raise SaediffError(f"block(s) {missing} of {lm.name} did not run")
    return box
