"""One prompt loader and one generation loop, shared by diff, steer, evals and the organism.

Prompt sources: a `.jsonl` file (a `prompt` or `question` string per line; other fields such
as `response`, `label`, `topic` are kept), a plain text file (one prompt per line), or the
organism's held-out questions: `organism`, `organism:untrained`, `organism:health,money`.

Generation seeds each prompt on its own (`seed * 1000003 + prompt index`), so an answer does
not depend on batching or on which other prompts are in the set.
"""
from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any, ContextManager

import torch

from saediff.errors import SaediffError

log = logging.getLogger(__name__)


def _organism_items(spec: str, questions_per_topic: int, seed: int) -> list[dict[str, Any]]:
    from saediff.organism.grammar import heldout_questions
    from saediff.organism.lexicon import TOPICS, TRAINED_TOPIC

    topics = (list(TOPICS) if spec in ("", "all") else
              [t for t in TOPICS if t != TRAINED_TOPIC] if spec == "untrained" else
              [t.strip() for t in spec.split(",") if t.strip()])
    bad = [t for t in topics if t not in TOPICS]
    if bad:
        raise SaediffError(f"unknown organism topic(s) {bad}; topics: {', '.join(TOPICS)}")
    return [{"id": f"{t}-{i}", "prompt": q, "topic": t}
            for t in topics for i, q in enumerate(heldout_questions(t, questions_per_topic, seed))]


def _read_lines(path: Path) -> list[str]:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8").splitlines()
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise SaediffError(f"{path}:{line}: not UTF-8 text (byte {exc.start}); "
                           "save the file as UTF-8") from exc


def load_prompt_items(src: str | Path, questions_per_topic: int = 5, seed: int = 0,
                      max_prompts: int | None = None) -> list[dict[str, Any]]:
    """[{'id', 'prompt', 'topic', ...row fields}] from a file or an organism source."""
    s = str(src)
    if s == "organism" or s.startswith("organism:"):
        items = _organism_items(s.partition(":")[2], questions_per_topic, seed)
    else:
        path = Path(s)
        if not path.is_file():
            raise FileNotFoundError(f"prompts file not found: {path} (or use organism[:untrained])")
        items = []
        for i, line in enumerate(_read_lines(path)):
            if not line.strip():
                continue
            if path.suffix != ".jsonl":
                items.append({"id": str(len(items)), "prompt": line.strip(), "topic": None})
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SaediffError(f"{path}:{i + 1}: not valid JSON ({exc.msg})") from exc
            text = (row.get("prompt") or row.get("question")) if isinstance(row, dict) else None
            if not isinstance(text, str) or not text:
                raise SaediffError(f"{path}:{i + 1}: needs a non-empty string 'prompt' "
                                   "(or 'question') field")
            items.append({**row, "id": str(row.get("id", len(items))), "prompt": text,
                          "topic": row.get("topic")})
    if max_prompts is not None:
        items = items[:max_prompts]
    if not items:
        raise SaediffError(f"{s}: the prompt set is empty; give a file with at least one prompt")
    return items


@torch.no_grad()
def generate_answers(lm: Any, items: list[dict[str, Any]], samples: int, max_new_tokens: int = 64,
                     temperature: float = 1.0, seed: int = 0, batch_size: int = 32,
                     context: ContextManager[Any] | None = None,
                     system: str | None = None) -> list[dict[str, Any]]:
    """`samples` answers per prompt item through the chat template; one record per answer
    ({id, topic, question, sample, answer}), in item order. `context` (e.g. a steering
    context) is entered around all generation. Temperature 0 is greedy. An item's optional
    `history` [(user, assistant), ...] is rendered as earlier chat turns before its prompt."""
    from saediff.models import encode_chat

    tok = lm.tokenizer
    sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) \
        if temperature > 0 else dict(do_sample=False)
    records = []
    with context or contextlib.nullcontext():
        for i, item in enumerate(items):
            ids = torch.tensor([encode_chat(tok, item["prompt"], None, system,
                                            history=item.get("history"))[0]], device=lm.device)
            torch.manual_seed(seed * 1000003 + i)
            done = 0
            while done < samples:
                b = min(batch_size, samples - done)
                gen = lm.generate(input_ids=ids.expand(b, -1),
                                  attention_mask=torch.ones_like(ids).expand(b, -1),
                                  max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id,
                                  pad_token_id=tok.pad_token_id, **sampling)
                for k, row in enumerate(gen[:, ids.shape[1]:]):
                    records.append({"id": item.get("id", str(i)), "topic": item.get("topic"),
                                    "question": item["prompt"], "sample": done + k,
                                    "answer": tok.decode(row, skip_special_tokens=True).strip()})
                done += b
    return records
