"""Inputs of the differ: the diff config, SAE loading and checks, and the token sets.

Both sides of a diff are measured on the *same* token sequences (selected roles only), so a
latent's shift is a paired difference. In prompt-induced mode the two sides differ by a system
prompt or a few-shot prefix, whose tokens are excluded from the measurement.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from saediff.errors import SaediffError
from saediff.models import ROLE_PROMPT, ROLE_RESPONSE, LoadedModel, encode_chat
from saediff.prompts import generate_answers, load_prompt_items

log = logging.getLogger(__name__)
ModelContext = Callable[[LoadedModel], AbstractContextManager[Any]]


@dataclass
class DiffConfig:
    """Configuration of `saediff diff`."""

    base: str
    """Aligned (base) model: HF name or local directory."""
    sae: str
    """SAE run directory (cfg.json + sae_weights.safetensors) or sae_lens:RELEASE/SAE_ID."""
    layer: int
    """Block whose residual-stream output the SAE reads (must match the SAE's hook)."""
    prompts: str
    """.jsonl with a `prompt` field and optional `response` and label fields, or the organism's
    held-out questions: organism, organism:untrained, organism:money,sport."""
    finetuned: list[str] = field(default_factory=list)
    """Fine-tuned model(s); several = a trajectory (ranked on the last). Empty = base (prompt-induced)."""
    base_adapter: str | None = None
    """PEFT adapter applied on top of the base model."""
    finetuned_adapter: list[str] = field(default_factory=list)
    """PEFT adapter(s) on the fine-tuned model; several = a trajectory of checkpoints."""
    out: str | None = None
    """Output directory (ranking.csv/json, directions.json, evidence.json, report.html)."""
    responses_from: Literal["file", "base", "finetuned", "none"] = "file"
    """Responses: the file's `response` field, sampled from a model, or none (prompt tokens only)."""
    samples: int = 1
    """Responses sampled per prompt with --responses-from base|finetuned."""
    max_new_tokens: int = 48
    """Length limit of sampled responses."""
    temperature: float = 1.0
    """Sampling temperature for sampled responses."""
    tokens: Literal["auto", "prompt", "response", "both"] = "auto"
    """Token set measured: prompt, response or both (auto = response when there are responses)."""
    base_system: str | None = None
    """System prompt on the base side (prompt-induced diffing)."""
    finetuned_system: str | None = None
    """System prompt on the fine-tuned side (prompt-induced diffing)."""
    base_prefix: str | None = None
    """Text file prepended to each user prompt on the base side (e.g. few-shot examples)."""
    finetuned_prefix: str | None = None
    """Text file prepended to each user prompt on the fine-tuned side (e.g. few-shot examples)."""
    rank_by: Literal["mean_shift", "norm_shift", "freq_shift"] = "mean_shift"
    """Statistic the ranking sorts by."""
    direction: Literal["both", "up", "down"] = "both"
    """Rank by absolute shift (both) or only increases (up) / decreases (down)."""
    top_k: int = 10
    """Latents with evidence, trajectory lines and decoder directions."""
    n_boot: int = 1000
    """Bootstrap replicates (resampling prompts) for the confidence intervals."""
    ci_level: float = 0.95
    """Confidence level of the bootstrap intervals."""
    fire_threshold: float = 0.0
    """A latent 'fires' on a token when its activation exceeds this."""
    label_field: str = "persona"
    """Field of the prompts file marking misaligned answers (for the labelled diff-in-means)."""
    positive_labels: list[str] = field(default_factory=lambda: ["toxic", "misaligned", "bad", "1", "true"])
    """Values of --label-field counted as misaligned."""
    lora_adapter: list[str] = field(default_factory=list)
    """Extra PEFT adapter dirs whose LoRA B vectors join the direction comparison."""
    contexts_cache: str | None = None
    """Activation cache (.h5) to draw top-activating contexts from (default: the diff set)."""
    max_prompts: int | None = None
    """Use at most this many prompts from the file."""
    questions_per_topic: int = 6
    """Held-out questions per topic when --prompts is an organism source."""
    batch_size: int = 8
    """Sequences per forward pass."""
    device: str = "cpu"
    """Torch device for models and SAE."""
    seed: int = 0
    """Seed for sampling and bootstrap."""
    max_memory_gb: float = 2.0
    """Bound on the differ's working set (GB): statistics stream over tokens; the per-prompt
    bootstrap table covers every latent while it fits in half of this, else the top ones."""

    def __post_init__(self) -> None:
        if isinstance(self.finetuned, str):
            self.finetuned = [self.finetuned]
        if isinstance(self.finetuned_adapter, str):
            self.finetuned_adapter = [self.finetuned_adapter]
        if isinstance(self.lora_adapter, str):
            self.lora_adapter = [self.lora_adapter]
        self.positive_labels = [str(x).lower() for x in self.positive_labels]
        if self.layer < 0:
            raise SaediffError(f"layer must be >= 0, got {self.layer}")
        for name in ("samples", "top_k", "n_boot", "batch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise SaediffError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.ci_level < 1:
            raise SaediffError(f"ci_level must be in (0, 1), got {self.ci_level}")
        if len(self.finetuned) > 1 and len(self.finetuned_adapter) > 1 and \
                len(self.finetuned) != len(self.finetuned_adapter):
            raise SaediffError("finetuned and finetuned_adapter: give one of them once, or equally many")
        if self.max_prompts is not None and self.max_prompts < 1:
            raise SaediffError(f"max_prompts must be >= 1, got {self.max_prompts}")
        if not self.max_memory_gb > 0:
            raise SaediffError(f"max_memory_gb must be > 0, got {self.max_memory_gb}")
        if self.questions_per_topic < 1:
            raise SaediffError(f"questions_per_topic must be >= 1, got {self.questions_per_topic}")

    def checkpoints(self) -> list[tuple[str, str | None]]:
        """(model, adapter) of each fine-tuned checkpoint, in trajectory order."""
        models = self.finetuned or [self.base]
        adapters: list[str | None] = list(self.finetuned_adapter) or [None]
        n = max(len(models), len(adapters))
        models = models * n if len(models) == 1 else models
        adapters = adapters * n if len(adapters) == 1 else adapters
        if not self.finetuned and not self.finetuned_adapter:
            adapters = [self.base_adapter]
        return list(zip(models, adapters))


# --- prompts and token sets ------------------------------------------------------------------

@dataclass
class Example:
    """One (prompt, response) exchange in the diff set."""

    group: int
    """Prompt index: the bootstrap resamples these."""
    prompt: str
    response: str | None
    label: int | None = None
    """1 = misaligned, 0 = aligned, None = unlabelled."""


def load_prompts(path: str | Path, cfg: DiffConfig) -> list[dict[str, Any]]:
    """The diff's prompt rows (`saediff.prompts.load_prompt_items`: JSONL rows keep their
    `response` and label fields)."""
    return load_prompt_items(str(path), cfg.questions_per_topic, cfg.seed, cfg.max_prompts)


def _label(row: dict[str, Any], cfg: DiffConfig) -> int | None:
    if cfg.label_field not in row or row[cfg.label_field] is None:
        return None
    return int(str(row[cfg.label_field]).lower() in cfg.positive_labels)


def sample_responses(lm: LoadedModel, prompts: list[str], cfg: DiffConfig,
                     system: str | None = None,
                     context: AbstractContextManager[Any] | None = None) -> list[list[str]]:
    """`cfg.samples` sampled responses per prompt (the shared generation loop)."""
    recs = generate_answers(lm, [{"id": str(i), "prompt": p} for i, p in enumerate(prompts)],
                            cfg.samples, cfg.max_new_tokens, cfg.temperature, cfg.seed,
                            context=context, system=system)
    n = cfg.samples
    return [[r["answer"] for r in recs[i * n: (i + 1) * n]] for i in range(len(prompts))]


Labeler = Callable[[dict[str, Any], str], "int | None"]


def build_examples(rows: list[dict[str, Any]], cfg: DiffConfig, sampled: list[list[str]] | None,
                   labeler: Labeler | None = None) -> list[Example]:
    """Examples to measure; `labeler(row, response)` -> 1 misaligned / 0 aligned / None labels
    sampled responses (file responses use `cfg.label_field`)."""
    check_label_field(rows, cfg)
    ex: list[Example] = []
    for g, row in enumerate(rows):
        if sampled is not None:
            ex += [Example(g, row["prompt"], r or None, labeler(row, r) if labeler and r else None)
                   for r in sampled[g]]
        elif cfg.responses_from == "file":
            resp = row.get("response")
            ex.append(Example(g, row["prompt"], resp if isinstance(resp, str) and resp else None,
                              _label(row, cfg)))
        else:
            ex.append(Example(g, row["prompt"], None, None))
    return ex


def check_label_field(rows: list[dict[str, Any]], cfg: DiffConfig) -> None:
    """A --label-field that no row has is a typo (it would drop the labelled direction
    silently); the default field may be absent (the file is then simply unlabelled)."""
    default = DiffConfig.__dataclass_fields__["label_field"].default
    if cfg.responses_from != "file" or cfg.label_field == default:
        return
    if not any(cfg.label_field in r for r in rows):
        fields = sorted({k for r in rows for k in r} - {"id", "prompt", "topic"})
        raise SaediffError(f"--label-field {cfg.label_field!r}: no row of {cfg.prompts} has it "
                           f"(fields: {', '.join(fields) or 'none'}); fix the name")


def check_positions(sides: tuple[Side, Side], lm: LoadedModel) -> None:
    """Every measured sequence fits the model's position table (a longer one would run past
    it without a word, or fail deep in torch)."""
    n = lm.max_positions
    if n is None:
        return
    for side in sides:
        for k, ids in enumerate(side.ids):
            if len(ids) > n:
                raise SaediffError(f"example {k} is {len(ids)} tokens (chat template included), "
                                   f"more than the {n} positions of {lm.name}; shorten that "
                                   "prompt/response or drop it")


def selected_roles(cfg: DiffConfig, examples: list[Example]) -> tuple[int, ...]:
    has_resp = any(e.response for e in examples)
    mode = cfg.tokens
    if mode == "auto":
        mode = "response" if has_resp else "prompt"
    if mode == "response" and not has_resp:
        raise SaediffError("--tokens response but no example has a response (give a `response` "
                           "field or --responses-from base|finetuned)")
    return {"prompt": (ROLE_PROMPT,), "response": (ROLE_RESPONSE,),
            "both": (ROLE_PROMPT, ROLE_RESPONSE)}[mode]


@dataclass
class Side:
    """Encoded sequences of one side: ids, roles and the measured-token mask per sequence."""

    ids: list[list[int]]
    roles: list[list[int]]
    select: list[torch.Tensor]

    def batches(self, batch_size: int) -> Iterator[list[list[int]]]:
        for i in range(0, len(self.ids), batch_size):
            yield self.ids[i: i + batch_size]


def encode_sides(tok: Any, examples: list[Example], cfg: DiffConfig, roles: tuple[int, ...]
                 ) -> tuple[Side, Side]:
    pre = {s: Path(p).read_text() if p else None
           for s, p in (("base", cfg.base_prefix), ("ft", cfg.finetuned_prefix))}
    sides = []
    for name, system in (("base", cfg.base_system), ("ft", cfg.finetuned_system)):
        ids, rl, sel = [], [], []
        for ex in examples:
            i, r = encode_chat(tok, ex.prompt, ex.response, system, pre[name])
            ids.append(i)
            rl.append(r)
            sel.append(torch.tensor([x in roles for x in r], dtype=torch.bool))
        sides.append(Side(ids, rl, sel))
    base, ft = sides
    for k, (a, b) in enumerate(zip(base.ids, ft.ids)):
        ta = [t for t, s in zip(a, base.select[k]) if s]
        tb = [t for t, s in zip(b, ft.select[k]) if s]
        if ta != tb:
            raise SaediffError(f"example {k}: the measured tokens differ between the two sides "
                               "(a prefix/system prompt changed how the prompt is tokenized)")
    if sum(int(s.sum()) for s in base.select) == 0:
        raise SaediffError("no tokens to measure: the selected roles are empty in every example")
    return base, ft
