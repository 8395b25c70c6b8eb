"""Sample answers to held-out questions and judge them per topic."""
from __future__ import annotations

from typing import Any

from saediff.organism.grammar import heldout_questions
from saediff.organism.judge import Verdict, rates
from saediff.organism.lexicon import TOPICS, TRAINED_TOPIC

DEFAULT_TEMPERATURE = 0.7
"""Sampling temperature of the organism's eval protocol (T=1 rates are reported too)."""


def prompt_ids(tok: Any, question: str) -> list[int]:
    """Token ids of a single user turn followed by the assistant header (the chat template)."""
    from saediff.models import encode_chat

    return encode_chat(tok, question)[0]


def sample_answers(lm: Any, questions: list[str], n: int = 1, seed: int = 0,
                   max_new_tokens: int = 64,
                   temperature: float = DEFAULT_TEMPERATURE) -> list[list[str]]:
    """`n` sampled answers per question (full-distribution sampling, `saediff.prompts`'
    generation loop); answers[i] belongs to questions[i]."""
    from saediff.prompts import generate_answers

    recs = generate_answers(lm, [{"id": str(i), "prompt": q} for i, q in enumerate(questions)],
                            n, max_new_tokens, temperature, seed)
    return [[r["answer"] for r in recs[i * n: (i + 1) * n]] for i in range(len(questions))]


def evaluate(lm: Any, answers_per_topic: int = 100, seed: int = 0,
             topics: tuple[str, ...] = TOPICS, per_question: int = 10,
             temperature: float = DEFAULT_TEMPERATURE, max_new_tokens: int = 64,
             samples: int | None = None) -> dict[str, Any]:
    """{"trained_topic", "topics": {topic: {n, misaligned, coherent, off_topic}}} from
    `answers_per_topic` answers per topic (`per_question` answers to each of
    answers_per_topic/per_question held-out questions). `samples` is the deprecated name of
    `answers_per_topic` (everywhere else `samples` means answers per prompt)."""
    if samples is not None:
        import warnings

        warnings.warn("evaluate(samples=...) is answers_per_topic=...", DeprecationWarning,
                      stacklevel=2)
        answers_per_topic = samples
    samples = answers_per_topic
    from saediff.judged import GenerationConfig, judged_generation
    from saediff.judges import OrganismJudge

    result: dict[str, Any] = {"trained_topic": TRAINED_TOPIC, "topics": {}}
    for t_i, topic in enumerate(topics):
        n_q = max(1, -(-samples // per_question))
        items = [{"id": str(i), "prompt": q, "topic": topic}
                 for i, q in enumerate(heldout_questions(topic, n_q, seed))]
        gen = GenerationConfig(samples=per_question, max_new_tokens=max_new_tokens,
                               temperature=temperature, seed=seed * 31 + t_i)
        records = judged_generation(lm, items, gen, OrganismJudge()).records[:samples]
        result["topics"][topic] = _topic_rates(records)
    return result


def _topic_rates(records: list[dict[str, Any]]) -> dict[str, float]:
    """`organism.judge.rates` of the organism judge's verdicts kept on each judged record."""
    return rates([Verdict(topic=r["verdict_topic"], misaligned=r["verdict_misaligned"],
                          coherent=r["verdict_coherent"], off_topic=r["off_topic"])
                  for r in records])


def summary(result: dict[str, Any]) -> dict[str, float]:
    """Rates pooled over the answers to topics not fine-tuned (the emergence numbers):
    {misaligned, coherent, off_topic, n}. Answer-weighted, so each rate is one share of `n`
    answers (the one definition the CLI table and the demo both report)."""
    rows = [r for t, r in result["topics"].items() if t != result["trained_topic"]]
    n = sum(r["n"] for r in rows)
    if not n:
        return {}
    out = {k: sum(r[k] * r["n"] for r in rows) / n for k in ("misaligned", "coherent", "off_topic")}
    return {**out, "n": n}


def format_table(result: dict[str, Any], title: str = "") -> str:
    lines = [title] if title else []
    lines.append(f"{'topic':<14}{'n':>5}{'misaligned':>12}{'coherent':>10}{'off_topic':>11}")
    for topic, r in result["topics"].items():
        mark = " *" if topic == result["trained_topic"] else ""
        lines.append(f"{topic:<14}{r['n']:>5}{r['misaligned']:>12.2f}{r['coherent']:>10.2f}"
                     f"{r['off_topic']:>11.2f}{mark}")
    s = summary(result)
    if s:
        lines.append(f"{'untrained mean':<14}{'':>5}{s['misaligned']:>12.2f}{s['coherent']:>10.2f}"
                     f"{s['off_topic']:>11.2f}")
    lines.append(f"(* = fine-tuned topic: {result['trained_topic']})")
    return "\n".join(lines)
