"""`saediff experiment icl`: in-context emergent misalignment, measured against the fine-tune.

    res = run(ICLConfig(sae="runs/toy_topk"))        # the toy organism by default
    res["dose_response"]["none"]["base"][-1]          # k_max shots: projection, EM rate

For k misaligned vs k aligned in-context examples (prior chat turns, same shot questions):

1. the in-context direction at the layer (mean over the evaluation question's tokens of
   base with misaligned shots − base with aligned shots) and its cosine, with a bootstrap CI
   over questions, to the LoRA B vector, the fine-tuned − base mean difference, the fine-tune's
   top SAE latents' decoders and the persona mean difference;
2. dose-response: projection on the fine-tune's direction and behaviour (organism judge: EM
   rate with Wilson CI; or the real organism's probe with a bootstrap CI) against k, for the
   base and the fine-tuned model, and the k at which the base reaches the unprompted fine-tune;
3. the latents in-context examples move most (the differ's ranking on the two shot
   conditions) and their overlap with the fine-tune's top latents;
4. rerouting: the fine-tuned model with its direction ablated / top latent clamped to 0;
5. every system-prompt condition (none / default / safety) side by side.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from saediff.errors import SaediffError

log = logging.getLogger(__name__)
HELP = "in-context EM: direction from shots in the base model vs the fine-tune's, dose-response"


@dataclass
class ICLConfig:
    """Configuration of `saediff experiment icl`."""

    sae: str | None = None
    """SAE run directory at the layer (optional: without it no latent ranking or clamp)."""
    base: str | None = None
    """Base model (default: the toy organism's base/)."""
    adapter: str | None = None
    """PEFT adapter on --base that is the fine-tune (default with the organism: its adapter/)."""
    finetuned: str | None = None
    """Fine-tuned model directory (instead of --adapter)."""
    lora_adapter: str | None = None
    """Adapter whose LoRA B vector is a reference direction (default: --adapter)."""
    layer: int | None = None
    """Block whose residual output is measured (default: the SAE's layer, else the organism's)."""
    pool: str = "persona"
    """In-context examples: persona (toy toxic persona, untrained topics), narrow (toy bad health
    advice), real-health, real-finance, or a .jsonl with prompt, misaligned, aligned."""
    pool_size: int = 200
    """Pool entries generated (named pools)."""
    prompts: str = "organism:untrained"
    """Evaluation questions: an organism source, a prompt file, or `real` (probe questions)."""
    behaviour: Literal["auto", "judge", "probe", "none"] = "auto"
    """Behaviour read-out: organism judge (sampled answers), the likelihood probe, or none."""
    ks: list[int] = field(default_factory=lambda: [0, 1, 2, 4, 8, 16])
    """Numbers of in-context examples (ks beyond the model's positions are skipped)."""
    systems: list[str] = field(default_factory=lambda: ["none", "default", "safety"])
    """System-prompt conditions: none, default, safety."""
    default_system: str | None = None
    """Text of the `default` system prompt (default: a built-in one)."""
    safety_system: str | None = None
    """Text of the `safety` system prompt (default: a built-in one)."""
    reroute: bool = True
    """Also run the fine-tuned model with its direction ablated and its top latent clamped."""
    questions_per_topic: int = 3
    """Held-out questions per topic for organism prompt sources."""
    max_prompts: int | None = None
    """Use at most this many evaluation questions."""
    samples: int = 4
    """Answers sampled per question and condition (judge)."""
    max_new_tokens: int = 48
    """Length limit of sampled answers."""
    temperature: float = 0.7
    """Sampling temperature (the organism's protocol: 0.7)."""
    top_k: int = 10
    """Latents reported per ranking (and compared for overlap)."""
    n_boot: int = 1000
    """Bootstrap replicates (resampling questions)."""
    ci_level: float = 0.95
    """Confidence level of all intervals."""
    batch_size: int = 8
    """Sequences per forward pass."""
    seed: int = 0
    """Seed of shots, sampling and bootstrap."""
    device: str = "cpu"
    """Torch device."""
    out: str | None = None
    """Output directory (result.json, icl.html)."""

    def __post_init__(self) -> None:
        if isinstance(self.ks, int):
            self.ks = [self.ks]
        if isinstance(self.systems, str):
            self.systems = [self.systems]
        if not self.ks or any(int(k) < 0 for k in self.ks):
            raise SaediffError(f"ks must be non-negative numbers of shots, got {self.ks}")
        self.ks = sorted({int(k) for k in self.ks})
        if not self.systems:
            raise SaediffError("systems must name at least one condition (none, default, safety)")
        bad = [s for s in self.systems if s not in ("none", "default", "safety")]
        if bad:
            raise SaediffError(f"unknown system-prompt condition(s) {bad}; use none, default, safety")
        for name in ("pool_size", "questions_per_topic", "samples", "max_new_tokens", "top_k",
                     "n_boot", "batch_size"):
            if getattr(self, name) < 1:
                raise SaediffError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.ci_level < 1:
            raise SaediffError(f"ci_level must be in (0, 1), got {self.ci_level}")
        if self.temperature < 0:
            raise SaediffError(f"temperature must be >= 0, got {self.temperature}")
        if self.adapter and self.finetuned:
            raise SaediffError("give the fine-tune as --adapter or --finetuned, not both")
        if self.max_prompts is not None and self.max_prompts < 1:
            raise SaediffError(f"max_prompts must be >= 1, got {self.max_prompts}")


CONFIG = ICLConfig


def resolve(cfg: ICLConfig) -> ICLConfig:
    """Fill the organism defaults and the behaviour read-out."""
    kw: dict[str, Any] = {}
    if cfg.base is None:
        from saediff.organism import organism_path

        o = organism_path()
        kw["base"] = str(o / "base")
        if not cfg.adapter and not cfg.finetuned:
            kw["adapter"] = str(o / "adapter")
    if not cfg.adapter and not cfg.finetuned and "adapter" not in kw:
        raise SaediffError("no fine-tune: give --adapter (PEFT on --base) or --finetuned")
    if cfg.behaviour == "auto":
        kw["behaviour"] = ("judge" if cfg.prompts.startswith("organism")
                           else "probe" if cfg.prompts == "real" else "none")
    if cfg.behaviour == "judge" and not cfg.prompts.startswith("organism"):
        raise SaediffError("--behaviour judge scores with the organism's judge: use organism "
                           "questions (--prompts organism:untrained) or --behaviour probe")
    if cfg.behaviour == "probe" and cfg.prompts != "real":
        raise SaediffError("--behaviour probe needs questions with reference answers: --prompts real")
    return replace(cfg, **kw)


def run(cfg: ICLConfig) -> dict[str, Any]:
    """Run the experiment; writes `cfg.out/result.json` and `icl.html`; returns the result."""
    from saediff.config import config_to_dict
    from saediff.experiments.common import prepare_out, write_figure, write_result
    from saediff.experiments.icl_report import figure
    from saediff.experiments.icl_run import execute

    out = prepare_out(cfg.out)  # before any model runs
    cfg = resolve(cfg)
    result = execute(cfg)
    if out is not None:
        seeds = {"shots": cfg.seed, "sampling": cfg.seed, "bootstrap": cfg.seed}
        write_result(out, {"experiment": "icl", "config": config_to_dict(cfg), "seeds": seeds,
                           **result})
        write_figure(figure(result), out / "icl.html")
    return result


def summary_lines(res: dict[str, Any]) -> list[str]:
    """The tables the CLI prints: dose-response per system and the direction cosines."""
    from saediff.experiments.icl_report import summary_lines as lines

    return lines(res)


def run_icl(cfg: ICLConfig) -> dict[str, Any]:
    """Alias of `run` (the Python entry point named after the experiment)."""
    return run(cfg)
