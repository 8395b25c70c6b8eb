"""Which token positions a steering hook edits: `positions="generated"` edits only tokens that
were not in the prompt (a pre-hook on the model reads the KV cache length of every forward)."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


class PositionTracker:
    """Which absolute token positions of the current forward are 'generated'.

    A pre-hook on the top model reads the KV cache length (past) and the input length T.
    A forward with an empty cache starts a new prompt of length T (with `use_cache=False`
    a forward one token longer than the previous one continues the same generation).
    """

    def __init__(self) -> None:
        self.past, self.prompt_len, self.prev_len, self.prev_batch = 0, 0, -1, -1

    def pre_hook(self, _mod: nn.Module, args: tuple, kwargs: dict) -> None:
        x = kwargs.get("input_ids")
        if x is None:
            x = kwargs.get("inputs_embeds")
        if x is None and args:
            x = args[0]
        if x is None:
            return
        batch, length = int(x.shape[0]), int(x.shape[1])
        # transformers >= 5.24 passes the KV cache as `cache`, earlier versions as `past_key_values`
        pkv = kwargs.get("past_key_values", kwargs.get("cache"))
        if pkv is None:
            past = 0
        elif hasattr(pkv, "get_seq_length"):
            past = int(pkv.get_seq_length())
        else:  # legacy tuple cache
            past = int(pkv[0][0].shape[-2]) if len(pkv) else 0
        if past == 0:
            continuing = (kwargs.get("use_cache") is False and batch == self.prev_batch
                          and length == self.prev_len + 1)
            if not continuing:
                self.prompt_len = length
        self.past, self.prev_len, self.prev_batch = past, past + length, batch

    def start(self, positions: Any) -> int:
        """First position (within this forward's tokens) to edit."""
        if positions == "all":
            return 0
        first = self.prompt_len if positions == "generated" else int(positions)
        return max(0, first - self.past)


def make_hook(edit: Callable, positions: Any, tracker: PositionTracker) -> Callable:
    def hook(_mod: nn.Module, _inp: Any, out: Any) -> Any:
        h = out[0] if isinstance(out, tuple) else out
        s = tracker.start(positions)
        if s >= h.shape[-2]:
            return None  # nothing to edit in this forward (e.g. the prefill)
        if s == 0:
            new = edit(h)
        else:
            new = torch.cat([h[..., :s, :], edit(h[..., s:, :])], dim=-2)
        return (new,) + tuple(out[1:]) if isinstance(out, tuple) else new

    return hook


def watch(top: nn.Module, tracker: PositionTracker) -> Any:
    """The tracker sees every forward of the top model (TL models: by wrapping `forward`)."""
    from saediff.steer.tl import ForwardWatch, is_transformer_lens

    if is_transformer_lens(top):
        return ForwardWatch(top, tracker.pre_hook)
    return top.register_forward_pre_hook(tracker.pre_hook, with_kwargs=True)
