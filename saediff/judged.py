"""The one judged-generation path: generate answers under a condition, judge them, summarise.

    run = judged_generation(lm, items, GenerationConfig(samples=4), make_judge("organism"),
                            condition=steer(lm, sae, latent=[j], clamp=0.0))   # or None
    run.records                              # one dict per answer, with its judge fields
    run.summary.misaligned_given_coherent    # docs/metrics.md's names, nothing else

Every caller that measures an EM rate (`saediff steer`, the sweep, `saediff compare`, LoRA
amplification, the demo, the experiments, examples/hard_case.py) goes through
`judged_generation`, so an answer with the same seed is the same answer everywhere and a rate
has one name. `GenerationConfig` and `JudgeConfig` are the shared sub-configs the stage configs
inherit (their fields stay flat: the same CLI flags and YAML keys in every stage).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Literal

from saediff.errors import SaediffError
from saediff.judges import Judge, JudgeScore, coherent_rate, make_judge, misaligned_given_coherent
from saediff.prompts import generate_answers


def _post_init_chain(obj: Any, cls: type) -> None:
    """Call the next `__post_init__` in the MRO after `cls` (cooperative mixins)."""
    nxt = getattr(super(cls, obj), "__post_init__", None)
    if nxt is not None:
        nxt()


@dataclass(kw_only=True)
class GenerationConfig:
    """How answers are sampled (shared by every stage that generates)."""

    samples: int = 10
    """Answers sampled per prompt (everywhere in saediff: per prompt, never per topic)."""
    max_new_tokens: int = 64
    """Length limit of each answer."""
    temperature: float = 1.0
    """Sampling temperature (full distribution; 0 = greedy)."""
    batch_size: int = 32
    """Answers generated per `generate` call."""
    seed: int = 0
    """Sampling seed (each prompt reseeds, so conditions share random streams)."""

    def __post_init__(self) -> None:
        for name in ("samples", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise SaediffError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise SaediffError(f"temperature must be a finite number >= 0, got {self.temperature}")
        _post_init_chain(self, GenerationConfig)

    def generation(self) -> GenerationConfig:
        """This config's generation fields alone (for a stage config that inherits them)."""
        return GenerationConfig(**{f.name: getattr(self, f.name)
                                   for f in dataclasses.fields(GenerationConfig)})


@dataclass(kw_only=True)
class JudgeConfig:
    """Which judge scores the answers (shared by every stage that judges)."""

    judge: Literal["organism", "openai", "none"] = "organism"
    """Judge: the organism's exact judge, an OpenAI-compatible endpoint, or none."""
    judge_base_url: str | None = None
    """OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1 (default $OPENAI_BASE_URL)."""
    judge_model: str | None = None
    """Judge model name (default $SAEDIFF_JUDGE_MODEL)."""

    def __post_init__(self) -> None:
        if self.judge not in ("organism", "openai", "none"):
            raise SaediffError(f"judge must be organism, openai or none, got {self.judge!r}")
        _post_init_chain(self, JudgeConfig)

    def make_judge(self) -> Judge | None:
        """The judge these fields name (None for `none`); an endpoint is checked here."""
        return None if self.judge == "none" else make_judge(self.judge, self.judge_base_url,
                                                           self.judge_model)


# --- the summary ------------------------------------------------------------------------------

METRICS = ("misaligned_given_coherent", "misaligned_of_all", "coherent_rate", "off_topic_rate")
"""The rates a `Summary` carries, named as in docs/metrics.md."""


@dataclass
class Summary:
    """Rates of one set of judged answers (docs/metrics.md's names); NaN where undefined."""

    n: int
    """Answers."""
    n_counted: int
    """Answers in the EM rate's denominator (scored and coherent > 50)."""
    n_unscored: int
    """Answers the judge gave no usable score."""
    misaligned_given_coherent: float
    misaligned_given_coherent_ci: list[float]
    misaligned_of_all: float
    coherent_rate: float
    coherent_rate_ci: list[float]
    off_topic_rate: float
    per_topic: dict[str, Summary] = field(default_factory=dict)

    def to_dict(self, per_topic: bool = True) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "per_topic"}
        if per_topic and self.per_topic:
            d["per_topic"] = {t: s.to_dict() for t, s in self.per_topic.items()}
        return d


def _share(k: int, n: int) -> float:
    return k / n if n else float("nan")


def summarise(scores: list[JudgeScore], records: list[dict[str, Any]] | None = None) -> Summary:
    """The rates of `scores` (with Wilson CIs), overall and per topic of `records`."""
    rate, lo, hi = misaligned_given_coherent(scores)
    coh, clo, chi = coherent_rate(scores)
    n = len(scores)
    out = Summary(n=n, n_counted=sum(s.counted for s in scores),
                  n_unscored=sum(s.aligned is None or s.coherent is None for s in scores),
                  misaligned_given_coherent=rate, misaligned_given_coherent_ci=[lo, hi],
                  misaligned_of_all=_share(sum(s.misaligned for s in scores), n),
                  coherent_rate=coh, coherent_rate_ci=[clo, chi],
                  off_topic_rate=_share(sum(s.off_topic for s in scores), n))
    recs = records or []
    for t in sorted({r.get("topic") for r in recs if r.get("topic") is not None}):
        out.per_topic[t] = summarise([s for s, r in zip(scores, recs) if r.get("topic") == t])
    return out


def em_reduction(unsteered: float | None, steered: float | None) -> float | None:
    """1 − steered ÷ unsteered EM rate (docs/metrics.md); None when either rate is undefined
    (NaN/None: no coherent answer) or the unsteered rate is 0 (nothing to reduce)."""
    if unsteered is None or steered is None or math.isnan(unsteered) or math.isnan(steered):
        return None
    return 1.0 - steered / unsteered if unsteered > 0 else None


# --- the path ---------------------------------------------------------------------------------

def judge_records(records: list[dict[str, Any]], judge: Judge | None) -> list[JudgeScore]:
    """Score every record in place (aligned, coherent, off_topic, misaligned, counted)."""
    scores = []
    for r in records:
        s = (JudgeScore(aligned=None, coherent=None) if judge is None
             else judge.score(r["question"], r["answer"], r.get("topic")))
        r.update({"aligned": s.aligned, "coherent": s.coherent, "off_topic": s.off_topic,
                  "counted": s.counted, "misaligned": s.misaligned, **s.extra})
        scores.append(s)
    return scores


@dataclass
class Judged:
    """The answers of one condition (judge fields filled in) and their summary."""

    records: list[dict[str, Any]]
    summary: Summary


def judged_generation(lm: Any, items: list[dict[str, Any]], gen: GenerationConfig,
                      judge: Judge | None, condition: AbstractContextManager[Any] | None = None,
                      system: str | None = None) -> Judged:
    """Generate `gen.samples` answers per item inside `condition` (a steering, ablation or
    amplification context; None = the model as it is), judge them, summarise them."""
    records = generate_answers(lm, items, gen.samples, gen.max_new_tokens, gen.temperature,
                               gen.seed, gen.batch_size, condition or contextlib.nullcontext(),
                               system=system)
    return Judged(records, summarise(judge_records(records, judge), records))
