"""Per-layer directions without any SAE (`saediff layers`): where a fine-tune writes, and
whether its misalignment direction agrees across fine-tunes, layer by layer.

One forward pass per model and batch gives the residual stream after every requested block
(`models.run_to_layers`, cut after the deepest). Per layer L and fine-tune i:

* `ft_minus_base` D_i[L]: mean over the measured tokens of h_ft − h_base (same tokens);
* `misaligned_minus_aligned` M_m[L] (labelled answers, inside model m — base or a fine-tune):
  mean residual over misaligned answers' tokens minus aligned answers' tokens (Soligo et al.);
* `increment` D_i[L] − D_i[L−1]: what block L itself adds to the difference (where it writes);
* LoRA B vectors of fine-tune i's adapter on block L's residual writers (`lora_b_vectors`).

Cosines across fine-tunes, between D and M, and their norms get percentile bootstrap CIs that
resample prompts (a prompt's aligned and misaligned answers stay together). Everything the
bootstrap needs is a per-prompt sum [G, L, d] per model, so memory is 8·G·L·d bytes per array.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from saediff.diff.directions import lora_b_vectors
from saediff.errors import SaediffError
from saediff.layerspec import check_layer_range, config_n_layers, parse_layers
from saediff.models import LoadedModel, encode_chat, load_model, pad_batch, run_to_layers

log = logging.getLogger(__name__)


@dataclass
class LayersConfig:
    """Configuration of `saediff layers`."""

    base: str
    """Aligned (base) model: HF name or local directory."""
    prompts: str
    """.jsonl with `prompt` (+ `response` and a label field), probe rows {question, aligned,
    misaligned} (both answers, labelled), a text file, or organism[:untrained]."""
    layers: str = "all"
    """Blocks to scan: all, a list and/or ranges (6,12,18 or 0-29)."""
    finetuned: list[str] = field(default_factory=list)
    """Fine-tuned model(s) to compare (with --finetuned-adapter: the model each adapter sits on)."""
    finetuned_adapter: list[str] = field(default_factory=list)
    """PEFT adapter(s) on --base (or on --finetuned): one fine-tune each."""
    names: list[str] = field(default_factory=list)
    """Display names of the fine-tunes (default: adapter or model directory names)."""
    base_adapter: str | None = None
    """PEFT adapter applied on top of the base model."""
    out: str | None = None
    """Output directory (layers.json, directions.safetensors, report.html)."""
    tokens: Literal["auto", "prompt", "response", "both"] = "auto"
    """Token set measured (auto = response tokens when there are responses)."""
    label_field: str = "persona"
    """Field of the prompts file marking misaligned answers."""
    positive_labels: list[str] = field(default_factory=lambda: ["toxic", "misaligned", "bad", "1", "true"])
    """Values of --label-field counted as misaligned."""
    max_prompts: int | None = None
    """Use at most this many prompts."""
    questions_per_topic: int = 6
    """Held-out questions per topic when --prompts is an organism source."""
    batch_size: int = 8
    """Sequences per forward pass."""
    n_boot: int = 1000
    """Bootstrap replicates (resampling prompts) for the CIs."""
    ci_level: float = 0.95
    """Confidence level of the bootstrap intervals."""
    device: str = "cpu"
    """Torch device."""
    seed: int = 0
    """Seed of the bootstrap."""

    def __post_init__(self) -> None:
        for name in ("finetuned", "finetuned_adapter", "names", "positive_labels"):
            if isinstance(getattr(self, name), str):
                setattr(self, name, [getattr(self, name)])
        self.positive_labels = [str(x).lower() for x in self.positive_labels]
        if str(self.layers).strip().lower() != "all":
            parse_layers(self.layers)  # syntax now, range once the model's depth is known
        if not self.finetuned and not self.finetuned_adapter:
            raise SaediffError("give the fine-tune(s) to scan: --finetuned-adapter A [B ...] "
                               "and/or --finetuned M [M2 ...]")
        if len(self.finetuned) > 1 and len(self.finetuned_adapter) > 1 and \
                len(self.finetuned) != len(self.finetuned_adapter):
            raise SaediffError("finetuned and finetuned_adapter: give one of them once, or equally many")
        n = max(len(self.finetuned), len(self.finetuned_adapter))
        if self.names and len(self.names) != n:
            raise SaediffError(f"--names: {len(self.names)} name(s) for {n} fine-tune(s); "
                               "give one name per fine-tune")
        for name in ("batch_size", "n_boot", "questions_per_topic"):
            if getattr(self, name) < 1:
                raise SaediffError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.ci_level < 1:
            raise SaediffError(f"ci_level must be in (0, 1), got {self.ci_level}")

    def finetunes(self) -> list[tuple[str, str, str | None]]:
        """(name, model, adapter) per fine-tune."""
        models = self.finetuned or [self.base]
        adapters: list[str | None] = list(self.finetuned_adapter) or [None]
        n = max(len(models), len(adapters))
        models = models * n if len(models) == 1 else models
        adapters = adapters * n if len(adapters) == 1 else adapters
        out = []
        for i, (m, a) in enumerate(zip(models, adapters)):
            name = self.names[i] if self.names else Path(a or m).name
            out.append((name if name not in [o[0] for o in out] else f"{name}#{i}", m, a))
        return out

    def layer_list(self, n_layers: int) -> list[int]:
        if str(self.layers).strip().lower() == "all":
            return list(range(n_layers))
        layers = parse_layers(self.layers)
        check_layer_range(layers, n_layers, self.base)
        return layers


# --- examples --------------------------------------------------------------------------------

@dataclass
class LabelledExample:
    group: int
    """Prompt index (the bootstrap resamples these)."""
    prompt: str
    response: str | None
    label: int | None
    """1 misaligned, 0 aligned, None unlabelled."""


def load_examples(cfg: LayersConfig) -> list[LabelledExample]:
    """Examples from the prompt rows; a probe row {question, aligned, misaligned} gives two."""
    from saediff.prompts import load_prompt_items

    rows = load_prompt_items(cfg.prompts, cfg.questions_per_topic, cfg.seed, cfg.max_prompts)
    groups: dict[str, int] = {}
    out = []
    for row in rows:
        g = groups.setdefault(row["prompt"], len(groups))
        if isinstance(row.get("aligned"), str) and isinstance(row.get("misaligned"), str) \
                and not row.get("response"):
            out += [LabelledExample(g, row["prompt"], row["aligned"], 0),
                    LabelledExample(g, row["prompt"], row["misaligned"], 1)]
            continue
        resp = row.get("response") if isinstance(row.get("response"), str) else None
        lab = row.get(cfg.label_field)
        label = None if lab is None or not resp else int(str(lab).lower() in cfg.positive_labels)
        out.append(LabelledExample(g, row["prompt"], resp or None, label))
    return out


def _roles(cfg: LayersConfig, examples: list[LabelledExample]) -> tuple[int, ...]:
    from saediff.models import ROLE_PROMPT, ROLE_RESPONSE

    has_resp = any(e.response for e in examples)
    mode = cfg.tokens if cfg.tokens != "auto" else ("response" if has_resp else "prompt")
    if mode == "response" and not has_resp:
        raise SaediffError("--tokens response but no example has a response")
    return {"prompt": (ROLE_PROMPT,), "response": (ROLE_RESPONSE,),
            "both": (ROLE_PROMPT, ROLE_RESPONSE)}[mode]


# --- accumulation (one forward pass per model and batch) -------------------------------------

class LayerSums:
    """Per-prompt residual sums [G, L, d] per model (and per label), token counts, norms."""

    def __init__(self, models: list[str], n_groups: int, n_layers: int, d: int):
        z = lambda: torch.zeros(n_groups, n_layers, d, dtype=torch.float64)  # noqa: E731
        self.total = {m: z() for m in models}
        self.label = {(m, lab): z() for m in models for lab in (0, 1)}
        self.count = torch.zeros(n_groups, dtype=torch.float64)
        self.label_count = {lab: torch.zeros(n_groups, dtype=torch.float64) for lab in (0, 1)}
        self.norm_sum = {m: torch.zeros(n_layers, dtype=torch.float64) for m in models}

    def add(self, model: str, h: torch.Tensor, sel: torch.Tensor, groups: torch.Tensor,
            labels: list[int | None], count: bool) -> None:
        """h [B, T, L, d] residuals, sel [B, T] measured-token mask, groups [B]."""
        s = sel.double()
        per_seq = torch.einsum("bt,btld->bld", s, h.double())  # [B, L, d]
        self.total[model].index_add_(0, groups, per_seq)
        self.norm_sum[model] += torch.einsum("bt,btl->l", s, h.double().norm(dim=-1))
        n = s.sum(1)
        for lab in (0, 1):
            keep = torch.tensor([x == lab for x in labels], dtype=torch.bool)
            if keep.any():
                self.label[(model, lab)].index_add_(0, groups[keep], per_seq[keep])
                if count:
                    self.label_count[lab].index_add_(0, groups[keep], n[keep])
        if count:
            self.count.index_add_(0, groups, n)


def _encode(tok: Any, examples: list[LabelledExample], roles: tuple[int, ...]
            ) -> tuple[list[list[int]], list[list[bool]]]:
    ids, sel = [], []
    for e in examples:
        i, r = encode_chat(tok, e.prompt, e.response)
        ids.append(i)
        sel.append([x in roles for x in r])
    if not any(any(s) for s in sel):
        raise SaediffError("no tokens to measure: the selected roles are empty in every example")
    return ids, sel


@torch.no_grad()
def accumulate(models: dict[str, LoadedModel], examples: list[LabelledExample],
               layers: list[int], roles: tuple[int, ...], batch_size: int) -> LayerSums:
    """Every model's per-prompt residual sums at every layer, batch by batch."""
    from tqdm.auto import tqdm

    first = next(iter(models.values()))
    ids, sel = _encode(first.tokenizer, examples, roles)
    n_groups = max(e.group for e in examples) + 1
    sums = LayerSums(list(models), n_groups, len(layers), first.d_model)
    for i0 in tqdm(range(0, len(ids), batch_size), desc="layers", disable=None):
        batch = ids[i0: i0 + batch_size]
        x, mask = pad_batch(batch, first.tokenizer.pad_token_id)
        s = torch.zeros(mask.shape, dtype=torch.bool)
        for k, m in enumerate(sel[i0: i0 + batch_size]):
            s[k, : len(m)] = torch.tensor(m)
        groups = torch.tensor([e.group for e in examples[i0: i0 + batch_size]])
        labels = [e.label for e in examples[i0: i0 + batch_size]]
        for j, (name, lm) in enumerate(models.items()):
            hs = run_to_layers(lm, x, mask, layers)
            h = torch.stack([hs[layer].float().cpu() for layer in layers], dim=2)  # [B, T, L, d]
            sums.add(name, h, s, groups, labels, count=j == 0)
    return sums


def load_models(cfg: LayersConfig) -> dict[str, LoadedModel]:
    """{'base': ..., fine-tune name: ...}; the same tokenizer and depth everywhere."""
    from saediff.models import check_same_tokenizer

    models = {"base": load_model(cfg.base, cfg.base_adapter, device=cfg.device)}
    for name, m, a in cfg.finetunes():
        if name == "base":
            raise SaediffError("a fine-tune cannot be named 'base'; pass --names")
        models[name] = load_model(m, a, device=cfg.device)
        check_same_tokenizer(models["base"], models[name])
    return models


def run_layers(cfg: LayersConfig) -> dict[str, Any]:
    """Load, check, measure, and compute every per-layer quantity (`layer_stats.summarise`)."""
    from saediff.diff.layer_stats import summarise
    from saediff.io import check_writable_dir

    if cfg.out:
        check_writable_dir(cfg.out)
    n = config_n_layers(cfg.base)
    if n is not None:
        cfg.layer_list(n)  # a bad --layers fails before any weights load
    examples = load_examples(cfg)
    roles = _roles(cfg, examples)
    models = load_models(cfg)
    base = models["base"]
    layers = cfg.layer_list(base.n_layers)
    sums = accumulate(models, examples, layers, roles, cfg.batch_size)
    lora = {name: _lora_per_layer(a, layers, base.d_model) if a else None
            for name, _, a in cfg.finetunes()}
    res = summarise(sums, layers, [f[0] for f in cfg.finetunes()], lora, cfg.n_boot,
                    cfg.ci_level, cfg.seed)
    from saediff.config import config_to_dict

    res["meta"] = {"config": config_to_dict(cfg), "d_model": base.d_model,
                   "n_layers": base.n_layers, "n_prompts": int(sums.count.numel()),
                   "n_examples": len(examples), "n_tokens": int(sums.count.sum()),
                   "n_labelled": {"aligned": sum(e.label == 0 for e in examples),
                                  "misaligned": sum(e.label == 1 for e in examples)},
                   "roles": list(roles),
                   "finetunes": [{"name": n_, "model": m, "adapter": a}
                                 for n_, m, a in cfg.finetunes()],
                   "models": {k: lm.provenance() for k, lm in models.items()}}
    return res


def _lora_per_layer(adapter: str, layers: list[int], d: int) -> list[list[Any]]:
    return [lora_b_vectors(adapter, layer, d, max_per_module=1) for layer in layers]
