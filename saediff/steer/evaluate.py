"""`saediff steer`: generate answers under steering, judge them, write the EM rate.

    cfg = SteerConfig(model=M, sae=RUN, latent=[j], clamp=0.0, prompts="organism:untrained",
                      samples=20, out="runs/steer")
    summary = run_steer(cfg)     # writes out/generations.jsonl and out/summary.json

Prompt sources (`prompts`): a .jsonl file (one object per line with `prompt` or `question`,
optional `topic` and `id`), a .txt file (one prompt per line), or the toy organism's held-out
questions: `organism` (all topics), `organism:untrained` (every topic but the fine-tuned one),
`organism:money,sport` (named topics); `questions_per_topic` of each.
"""
from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Literal

from saediff.errors import SaediffError
from saediff.io import check_writable_dir, output_lock, staged_outputs, write_json, write_jsonl
from saediff.judged import GenerationConfig, JudgeConfig, judged_generation
from saediff.prompts import load_prompt_items

log = logging.getLogger(__name__)
Context = Callable[[Any], AbstractContextManager[Any]]


@dataclass
class SteerConfig(GenerationConfig, JudgeConfig):
    """Configuration of `saediff steer` (sampling: `GenerationConfig`; judge: `JudgeConfig`)."""

    model: str
    """Model to generate with: HF name or local directory (base or merged fine-tune)."""
    prompts: str
    """Prompt source: .jsonl (prompt/question, topic), .txt, or organism[:untrained|:t1,t2]."""
    out: str | None = None
    """Output directory (generations.jsonl, summary.json)."""
    adapter: str | None = None
    """PEFT adapter applied on top of --model (base+adapter)."""
    sae: str | None = None
    """SAE run directory (SAELens format) or sae_lens:RELEASE/SAE_ID (a SAELens release)."""
    latent: list[int] = field(default_factory=list)
    """SAE latent index(es) to steer; several = all at once."""
    clamp: float | None = None
    """Clamp the latent(s) to this activation, keeping the SAE error term."""
    add: float | None = None
    """Add this multiple of the latent(s)' decoder direction to the residual stream."""
    layer: int | None = None
    """Block whose output is steered (default: the SAE's hook layer)."""
    positions: Literal["all", "generated"] = "all"
    """Steer every token, or only generated tokens (the prompt is left alone)."""
    questions_per_topic: int = 5
    """Held-out questions per topic for organism prompt sources."""
    max_prompts: int | None = None
    """Use at most this many prompts."""
    device: str = "cpu"
    """Torch device."""

    def __post_init__(self) -> None:
        if isinstance(self.latent, int):
            self.latent = [self.latent]
        from saediff.steer.hooks import check_unique_latents

        check_unique_latents(self.latent)
        if self.clamp is not None and self.add is not None:
            raise SaediffError("clamp and add: give at most one")
        if (self.clamp is not None or self.add is not None) and (not self.sae or not self.latent):
            raise SaediffError("sae and latent are required with clamp or add")
        if self.questions_per_topic < 1:
            raise SaediffError(f"questions_per_topic must be >= 1, got {self.questions_per_topic}")
        for name in ("clamp", "add"):
            v = getattr(self, name)
            if v is not None and not math.isfinite(v):
                raise SaediffError(f"--{name} must be a finite number, got {v}")
        if self.max_prompts is not None and self.max_prompts < 1:
            raise SaediffError(f"max_prompts must be >= 1, got {self.max_prompts}")
        super().__post_init__()  # GenerationConfig, JudgeConfig


def steer_context(sae: Any, latents: list[int], mode: str, value: float, layer: int | None,
                  positions: str) -> Context:
    """lm -> steering context manager (for `generate_answers` and the differ)."""
    from saediff.steer.hooks import steer

    def ctx(lm: Any) -> AbstractContextManager[Any]:
        kw = {mode: value}
        return steer(lm, sae, latent=latents, layer=layer, positions=positions, **kw)

    return ctx


STEER_OUTPUTS = ("generations.jsonl", "summary.json")


def run_steer(cfg: SteerConfig, lm: Any = None, sae: Any = None) -> dict[str, Any]:
    """Generate (steered when clamp/add is set), judge, write `out/`; returns the summary.

    One process per `out` at a time (`saediff.io.output_lock`); the files land together."""
    with output_lock(cfg.out) if cfg.out else contextlib.nullcontext():
        return _run_steer(cfg, lm, sae)


def _run_steer(cfg: SteerConfig, lm: Any, sae: Any) -> dict[str, Any]:
    from saediff.config import config_to_dict
    from saediff.models import load_model

    items = load_prompt_items(cfg.prompts, cfg.questions_per_topic, cfg.seed, cfg.max_prompts)
    if cfg.out:
        check_writable_dir(cfg.out)  # before any model runs
    judge = cfg.make_judge()
    sae = _checked_sae(cfg, sae)  # the SAE first: it is checked before the model loads
    lm = lm or load_model(cfg.model, cfg.adapter, device=cfg.device)
    mode = "clamp" if cfg.clamp is not None else "add" if cfg.add is not None else None
    value = cfg.clamp if mode == "clamp" else cfg.add
    condition = None if mode is None else steer_context(sae, cfg.latent, mode, float(value),  # type: ignore[arg-type]
                                                        cfg.layer, cfg.positions)(lm)
    log.info("generating %d x %d answers (%s)", len(items), cfg.samples,
             f"{mode}={value} on latent(s) {cfg.latent}" if mode else "unsteered")
    run = judged_generation(lm, items, cfg.generation(), judge, condition)
    summary = run.summary.to_dict()
    summary.update({"mode": mode or "none", "latent": cfg.latent, "value": value,
                    "judge": cfg.judge, "model": lm.provenance(), "config": config_to_dict(cfg)})
    if cfg.out:
        with staged_outputs(cfg.out, STEER_OUTPUTS, "saediff steer") as stage:
            write_jsonl(stage / "generations.jsonl", run.records)
            write_json(stage / "summary.json", summary)
    return summary


def _checked_sae(cfg: SteerConfig, sae: Any) -> Any:
    """The SAE (loaded when only its path is given), checked against the latents asked for."""
    if sae is None and cfg.sae:
        from saediff.sae import load_sae

        sae = load_sae(cfg.sae, cfg.device)
    if sae is not None:
        from saediff.sae import require_activation_sae

        require_activation_sae(sae, cfg.sae or "given", "saediff steer")
    if sae is not None and cfg.latent:
        from saediff.steer.hooks import check_latents

        check_latents(sae, cfg.latent)  # before the model loads, before any generation
    return sae
