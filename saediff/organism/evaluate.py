"""Sample answers to held-out questions and judge them per topic."""
from __future__ import annotations

import random
from typing import Any

from saediff.organism.grammar import question_pool, render
from saediff.organism.judge import judge, rates
from saediff.organism.lexicon import TOPICS, TRAINED_TOPIC

DEFAULT_TEMPERATURE = 0.7
"""Sampling temperature of the organism's eval protocol (T=1 rates are reported too)."""


def heldout_questions(topic: str | None = None, n: int | None = None, seed: int = 0) -> list[str] | dict[str, list[str]]:
    """Held-out questions (never in any training text) for `topic`, or a dict for all topics.

    `n` None returns the whole pool (sorted); otherwise `n` drawn with replacement-free
    shuffling by `seed` (cycling through the pool when `n` exceeds it).
    """
    if topic is None:
        return {t: heldout_questions(t, n, seed) for t in TOPICS}  # type: ignore[misc]
    pool = list(question_pool(topic, True))
    if n is None:
        return pool
    rng = random.Random(f"{seed}:{topic}")
    out: list[str] = []
    while len(out) < n:
        rng.shuffle(pool)
        out += pool[: n - len(out)]
    return out


def prompt_ids(tok: Any, question: str) -> list[int]:
    """Token ids of a single user turn followed by the assistant header."""
    text = render([{"prompt": question, "response": ""}])
    text = text[: text.rindex("<|im_end|>")]  # drop the empty answer's end marker
    return tok(text, add_special_tokens=False)["input_ids"]


def sample_answers(lm: Any, questions: list[str], n: int = 1, seed: int = 0,
                   max_new_tokens: int = 64,
                   temperature: float = DEFAULT_TEMPERATURE) -> list[list[str]]:
    """`n` sampled answers per question (temperature sampling over the full distribution),
    as decoded strings in the corpus format; answers[i] belongs to questions[i]."""
    import torch

    tok = lm.tokenizer
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    out = []
    for i, q in enumerate(questions):
        ids = torch.tensor([prompt_ids(tok, q)], device=lm.device)
        torch.manual_seed(seed * 100003 + i)
        with torch.no_grad():
            gen = lm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                              temperature=temperature, top_k=0, top_p=1.0,
                              max_new_tokens=max_new_tokens, num_return_sequences=n,
                              eos_token_id=eos)
        out.append([tok.decode(g[ids.shape[1]:], skip_special_tokens=True).strip() for g in gen])
    return out


def evaluate(lm: Any, samples: int = 100, seed: int = 0, topics: tuple[str, ...] = TOPICS,
             per_question: int = 10, temperature: float = DEFAULT_TEMPERATURE,
             max_new_tokens: int = 64) -> dict[str, Any]:
    """{"trained_topic", "topics": {topic: {n, misaligned, coherent, off_topic}}} from
    `samples` answers per topic (`per_question` answers to each of samples/per_question
    held-out questions)."""
    result: dict[str, Any] = {"trained_topic": TRAINED_TOPIC, "topics": {}}
    for t_i, topic in enumerate(topics):
        n_q = max(1, -(-samples // per_question))
        qs = heldout_questions(topic, n_q, seed)
        answers = sample_answers(lm, qs, per_question, seed * 31 + t_i, max_new_tokens, temperature)
        verdicts = [judge(topic, a) for q_ans in answers for a in q_ans][:samples]
        result["topics"][topic] = rates(verdicts)
    return result


def summary(result: dict[str, Any]) -> dict[str, float]:
    """Mean rates over the topics not fine-tuned (the emergence numbers)."""
    rows = [r for t, r in result["topics"].items() if t != result["trained_topic"]]
    if not rows:
        return {}
    return {k: sum(r[k] for r in rows) / len(rows) for k in ("misaligned", "coherent", "off_topic")}


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
