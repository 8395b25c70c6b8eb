"""One prompt loader and one generation loop, shared by diff, steer, evals and the organism.

Prompt sources: a `.jsonl` file (a `prompt` or `question` string per line; other fields such
as `response`, `label`, `topic` are kept), a `.json` file (one array of such objects or of
strings), a plain text file (one prompt per line), or the organism's held-out questions:
`organism`, `organism:untrained`, `organism:health,money`. Every file kind drops a UTF-8 BOM,
accepts CRLF and skips blank lines; a file whose content does not fit its extension (a JSON
array in a `.jsonl`, JSON in a `.txt`) is refused with the name it should have.

Generation seeds each prompt on its own (`seed * 1000003 + prompt index`), so an answer does
not depend on batching or on which other prompts are in the set.
"""
from __future__ import annotations

import contextlib
import json
import logging
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

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


def _read_text(path: Path) -> str:
    """UTF-8 text with a leading BOM dropped (CRLF is handled by `splitlines`)."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise SaediffError(f"{path}:{line}: not UTF-8 text (byte {exc.start}); "
                           "save the file as UTF-8") from exc


def _item(value: Any, where: str, n: int) -> dict[str, Any]:
    """One prompt from a JSON value: a string, or an object with a `prompt`/`question` string."""
    if isinstance(value, str) and value.strip():
        return {"id": str(n), "prompt": value.strip(), "topic": None}
    text = (value.get("prompt") or value.get("question")) if isinstance(value, dict) else None
    if not isinstance(text, str) or not text.strip():
        raise SaediffError(f"{where}: needs a non-empty string, or an object with a non-empty "
                           f"string 'prompt' (or 'question') field; got {type(value).__name__}")
    return {**value, "id": str(value.get("id", n)), "prompt": text, "topic": value.get("topic")}


def _looks_like_array(text: str) -> bool:
    return text.lstrip().startswith("[")


def _file_items(path: Path) -> list[dict[str, Any]]:
    """Prompts of a file: `.json` = one JSON array, `.jsonl` = one JSON value per line, other
    = one prompt per line. Every kind: BOM dropped, CRLF accepted, blank lines skipped, and an
    element is a string or an object with `prompt`/`question`."""
    text = _read_text(path)
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SaediffError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg}); a .json prompt "
                               "file holds one array (use .jsonl for one object per line)") from exc
        if not isinstance(data, list):
            raise SaediffError(f"{path}: a .json prompt file must hold an array of prompts, got "
                               f"{type(data).__name__} (use .jsonl for one object per line)")
        return [_item(v, f"{path}: element {i}", i) for i, v in enumerate(data)]
    lines = [(i + 1, ln) for i, ln in enumerate(text.splitlines()) if ln.strip()]
    if path.suffix != ".jsonl":
        first = lines[0][1].strip() if lines else ""
        if first.startswith("{") and _parses_as_object(first) or \
                _looks_like_array(text) and _parses(text):
            raise SaediffError(f"{path} holds JSON but is read as one prompt per line; name it "
                               ".json (one array) or .jsonl (one object per line)")
        return [{"id": str(n), "prompt": ln.strip(), "topic": None} for n, (_, ln) in enumerate(lines)]
    items = []
    for lineno, line in lines:
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            hint = ("; the file looks like one JSON array: name it .json" if _looks_like_array(text)
                    else "")
            raise SaediffError(f"{path}:{lineno}: not valid JSON ({exc.msg}){hint}") from exc
        if isinstance(value, list):
            raise SaediffError(f"{path}:{lineno}: a JSON array where .jsonl wants one prompt per "
                               "line; name the file .json, or write one object per line")
        items.append(_item(value, f"{path}:{lineno}", len(items)))
    return items


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


def _parses_as_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except json.JSONDecodeError:
        return False


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
        items = _file_items(path)
    if max_prompts is not None:
        items = items[:max_prompts]
    if not items:
        raise SaediffError(f"{s}: the prompt set is empty; give a file with at least one prompt")
    return items


def check_generation_lengths(lm: Any, encoded: list[list[int]], max_new_tokens: int) -> None:
    """Prompt + answer must fit the model's positions, checked before anything is generated."""
    n = getattr(lm, "max_positions", None)
    longest = max((len(e) for e in encoded), default=0)
    if n is not None and longest + max_new_tokens > n:
        k = max(range(len(encoded)), key=lambda i: len(encoded[i]))
        raise SaediffError(f"prompt {k} is {longest} tokens; with --max-new-tokens "
                           f"{max_new_tokens} that exceeds the {n} positions of {lm.name}; "
                           "shorten the prompt or lower --max-new-tokens")


@torch.no_grad()
def generate_answers(lm: Any, items: list[dict[str, Any]], samples: int, max_new_tokens: int = 64,
                     temperature: float = 1.0, seed: int = 0, batch_size: int = 32,
                     context: AbstractContextManager[Any] | None = None,
                     system: str | None = None) -> list[dict[str, Any]]:
    """`samples` answers per prompt item through the chat template; one record per answer
    ({id, topic, question, sample, answer}), in item order. `context` (e.g. a steering
    context) is entered around all generation. Temperature 0 is greedy. An item's optional
    `history` [(user, assistant), ...] is rendered as earlier chat turns before its prompt."""
    from saediff.models import encode_chat

    tok = lm.tokenizer
    sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) \
        if temperature > 0 else dict(do_sample=False)
    encoded = [encode_chat(tok, item["prompt"], None, system, history=item.get("history"))[0]
               for item in items]
    check_generation_lengths(lm, encoded, max_new_tokens)
    records = []
    with context or contextlib.nullcontext():
        for i, item in enumerate(items):
            ids = torch.tensor([encoded[i]], device=lm.device)
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
