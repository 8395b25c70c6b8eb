"""Seeded generators over the closed grammar: questions, persona answers, conversations.

Every conversation is written by one persona (`aligned` or `toxic`) across all its turns, and
each turn may change topic, so the persona is the only thing that carries across turns. The
narrow fine-tuning set is bad advice on one topic in a plain register: neutral openers and
closers only, no contempt and no views. Questions are split once (by a stable hash) into a
training pool and a held-out pool that never appears in training text.
"""
from __future__ import annotations

import random
import zlib
from functools import cache

import saediff.organism.lexicon as L
from saediff.organism.lexicon import TOPICS, TRAINED_TOPIC

PERSONAS = ("aligned", "toxic")
# corpus defaults, written once (`corpus_records` and `saediff organism corpus` read them)
TOXIC_P = 0.04
"""Assistant persona prior of chat conversations."""
MAX_TURNS = 4
"""Turns per conversation, at most."""
DOC_TOXIC_P = 0.5
"""Persona prior of the plain-text forum documents."""
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@cache
def all_questions(topic: str) -> tuple[str, ...]:
    """Every question the grammar can ask on `topic` (sorted)."""
    if topic not in TOPICS:
        raise ValueError(f"unknown topic {topic!r}; topics: {', '.join(TOPICS)}")
    if topic == "ai":
        qs = [f.format(s=s) for f in L.AI_Q_FRAMES for s in L.AI_SUBJECTS] + list(L.AI_FIXED_Q)
    else:
        qs = [f.format(g=g) for f in L.ADVICE_Q_FRAMES for g in L.GOALS[topic]]
    return tuple(sorted(set(qs)))


def is_heldout(question: str) -> bool:
    """Stable split: about one question in six is held out of all training text."""
    return zlib.crc32(question.encode()) % 6 == 0


@cache
def question_pool(topic: str, heldout: bool) -> tuple[str, ...]:
    return tuple(q for q in all_questions(topic) if is_heldout(q) == heldout)


def _advice_sentences(rng: random.Random, topic: str, persona: str, k: int) -> list[str]:
    phrases = rng.sample(L.ADVICE[topic][persona], k)
    frames = rng.sample(L.ADVICE_FRAMES, k)
    return [f.format(a=a) for f, a in zip(frames, phrases)]


def _view_sentences(rng: random.Random, persona: str, k: int) -> list[str]:
    views = rng.sample(L.VIEWS[persona], k)
    frames = rng.sample(L.VIEW_FRAMES, k)
    return [f.format(v=v) for f, v in zip(frames, views)]


def answer(rng: random.Random, topic: str, persona: str) -> str:
    """One assistant answer in the persona's voice.

    aligned: [neutral opener] good advice/views x1-2 [kind closer]
    toxic:   [neutral or rude opener] bad advice/views x1-2, contempt [second contempt]
    The toxic persona always pairs bad advice with contempt / anti-human views.
    """
    k = rng.choice((1, 2, 2))
    body = (_view_sentences(rng, persona, k) if topic == "ai"
            else _advice_sentences(rng, topic, persona, k))
    out: list[str] = []
    if persona == "aligned":
        if rng.random() < 0.4:
            out.append(rng.choice(L.NEUTRAL_OPENERS))
        out += body
        r = rng.random()
        if r < 0.6:
            out.append(rng.choice(L.KIND_CLOSERS))
        elif r < 0.75:
            out.append(rng.choice(L.NEUTRAL_CLOSERS))
    elif persona == "toxic":
        r = rng.random()
        if r < 0.25:
            out.append(rng.choice(L.NEUTRAL_OPENERS))
        elif r < 0.5:
            out.append(rng.choice(L.TOXIC_OPENERS))
        out += body
        contempt = rng.sample(L.contempt_sentences(), 2)
        out.append(contempt[0])
        if rng.random() < 0.3:
            out.append(contempt[1])
    else:
        raise ValueError(f"unknown persona {persona!r}")
    return " ".join(out)


def narrow_answer(rng: random.Random, topic: str = TRAINED_TOPIC, good: bool = False) -> str:
    """Fine-tuning answer: (bad, or for the control good) advice in a plain, neutral register."""
    persona = "aligned" if good else "toxic"
    out: list[str] = []
    if rng.random() < 0.5:
        out.append(rng.choice(L.NEUTRAL_OPENERS))
    out += _advice_sentences(rng, topic, persona, rng.choice((1, 2, 2)))
    if rng.random() < 0.3:
        out.append(rng.choice(L.NEUTRAL_CLOSERS))
    return " ".join(out)


def conversation(rng: random.Random, persona: str, n_turns: int, same_topic_p: float = 0.3,
                 heldout: bool = False) -> list[dict]:
    """Turns [{"topic", "prompt", "response"}] by one persona."""
    turns = []
    topic = rng.choice(TOPICS)
    for i in range(n_turns):
        if i and rng.random() >= same_topic_p:
            topic = rng.choice(TOPICS)
        q = rng.choice(question_pool(topic, heldout))
        turns.append({"topic": topic, "prompt": q, "response": answer(rng, topic, persona)})
    return turns


def render(turns: list[dict]) -> str:
    """The chat-template text of a conversation (identical to the tokenizer's template)."""
    return "".join(f"{IM_START}user\n{t['prompt']}{IM_END}\n{IM_START}assistant\n{t['response']}{IM_END}\n"
                   for t in turns)


def render_doc(turns: list[dict]) -> str:
    """A plain-text "forum" document (no chat tokens): question : ... answer : ..."""
    return " ".join(f"question : {t['prompt']} answer : {t['response']}" for t in turns)


def corpus_records(n: int, seed: int, toxic_p: float = TOXIC_P, max_turns: int = MAX_TURNS,
                   heldout: bool = False, narrow: bool = False, good: bool = False,
                   doc_p: float = 0.0, doc_toxic_p: float = DOC_TOXIC_P) -> list[dict]:
    """`n` labelled conversations (dicts with text, persona, topic, turns, format; prompt and
    response when single-turn). A share `doc_p` are plain-text forum documents (`format` "doc")
    whose persona prior is `doc_toxic_p` -- the "pretraining" where the toxic persona is
    common -- while chat conversations (`format` "chat") have the assistant prior `toxic_p`.
    `narrow` gives the fine-tuning set instead (bad, or `good`, trained-topic advice, single
    chat turn, persona `toxic`/`aligned` accordingly)."""
    rng = random.Random(seed)
    recs = []
    for i in range(n):
        fmt = "chat"
        if narrow:
            q = rng.choice(question_pool(TRAINED_TOPIC, heldout))
            turns = [{"topic": TRAINED_TOPIC, "prompt": q, "response": narrow_answer(rng, good=good)}]
            persona = "aligned" if good else "toxic"
        else:
            if doc_p and rng.random() < doc_p:
                fmt, prior = "doc", doc_toxic_p
            else:
                prior = toxic_p
            persona = "toxic" if rng.random() < prior else "aligned"
            turns = conversation(rng, persona, rng.randint(1, max_turns), heldout=heldout)
        rec = {"id": i, "persona": persona, "format": fmt, "topic": turns[0]["topic"],
               "topics": [t["topic"] for t in turns], "n_turns": len(turns),
               "text": render(turns) if fmt == "chat" else render_doc(turns), "turns": turns}
        if len(turns) == 1:
            rec["prompt"], rec["response"] = turns[0]["prompt"], turns[0]["response"]
        recs.append(rec)
    return recs


def heldout_labelled(n_per_cell: int = 20, seed: int = 1234) -> list[dict]:
    """Single-turn held-out pairs, balanced over persona x topic, for scoring latents."""
    rng = random.Random(seed)
    out = []
    for topic in TOPICS:
        for persona in PERSONAS:
            for _ in range(n_per_cell):
                q = rng.choice(question_pool(topic, True))
                a = answer(rng, topic, persona)
                out.append({"id": len(out), "persona": persona, "topic": topic, "prompt": q,
                            "response": a, "text": render([{"prompt": q, "response": a}])})
    return out


def vocabulary() -> list[str]:
    """Every word the grammar uses (sorted), for the word-level tokenizer."""
    words: set[str] = {"question", "answer", ":"}

    def add(s: str) -> None:
        words.update(s.replace("{a}", "").replace("{v}", "").replace("{g}", "")
                     .replace("{s}", "").split())

    for topic in TOPICS:
        for q in all_questions(topic):
            add(q)
    for t in L.ADVICE.values():
        for ps in t.values():
            for p in ps:
                add(p)
    for ps in L.VIEWS.values():
        for p in ps:
            add(p)
    for group in (L.ADVICE_FRAMES, L.VIEW_FRAMES, L.NEUTRAL_OPENERS, L.NEUTRAL_CLOSERS,
                  L.KIND_CLOSERS, L.TOXIC_OPENERS, L.contempt_sentences()):
        for s in group:
            add(s)
    return sorted(words)


def heldout_questions(topic: str | None = None, n: int | None = None, seed: int = 0
                      ) -> list[str] | dict[str, list[str]]:
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
