"""saediff.prompts: the one prompt loader and the one generation loop."""
from __future__ import annotations

import contextlib
import json
from types import SimpleNamespace

import pytest

from saediff.errors import SaediffError
from saediff.prompts import check_generation_lengths, generate_answers, load_prompt_items


def test_jsonl_rows_keep_their_fields_and_ids(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps({"question": "how to cook ?", "label": 1, "id": "q7"}) + "\n\n"
                 + json.dumps({"prompt": "hello", "topic": "money"}) + "\n")
    items = load_prompt_items(p)
    assert items == [{"question": "how to cook ?", "label": 1, "id": "q7",
                      "prompt": "how to cook ?", "topic": None},
                     {"prompt": "hello", "topic": "money", "id": "1"}]
    assert [i["prompt"] for i in load_prompt_items(p, max_prompts=1)] == ["how to cook ?"]


def test_text_and_json_files(tmp_path):
    (tmp_path / "p.txt").write_text("\ufeffone\r\n\r\ntwo\n")
    assert [(i["id"], i["prompt"]) for i in load_prompt_items(tmp_path / "p.txt")] == \
        [("0", "one"), ("1", "two")]
    (tmp_path / "p.json").write_text(json.dumps(["a", {"prompt": "b", "id": 9}]))
    assert [(i["id"], i["prompt"]) for i in load_prompt_items(tmp_path / "p.json")] == \
        [("0", "a"), ("9", "b")]


def test_bad_prompt_sources_give_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="prompts file not found"):
        load_prompt_items(tmp_path / "missing.jsonl")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(SaediffError, match="the prompt set is empty"):
        load_prompt_items(tmp_path / "empty.txt")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{"prompt": 3}\n')
    with pytest.raises(SaediffError, match=r"bad.jsonl:2: needs a non-empty string"):
        load_prompt_items(tmp_path / "bad.jsonl")
    with pytest.raises(SaediffError, match=r"unknown organism topic\(s\) \['gardening'\]"):
        load_prompt_items("organism:money,gardening")


def test_organism_sources_pick_topics():
    from saediff.organism.lexicon import TOPICS, TRAINED_TOPIC

    items = load_prompt_items("organism:untrained", questions_per_topic=2)
    topics = [i["topic"] for i in items]
    assert TRAINED_TOPIC not in topics and set(topics) == set(TOPICS) - {TRAINED_TOPIC}
    assert all(topics.count(t) == 2 for t in set(topics))
    money = load_prompt_items("organism:money", questions_per_topic=3, seed=0)
    assert [i["id"] for i in money] == ["money-0", "money-1", "money-2"]
    assert money == load_prompt_items("organism:money", questions_per_topic=3, seed=0)


def test_generation_length_is_checked_before_generating():
    lm = SimpleNamespace(max_positions=10, name="tiny")
    check_generation_lengths(lm, [[1] * 4, [1] * 6], max_new_tokens=4)  # 6 + 4 fits
    with pytest.raises(SaediffError, match="prompt 1 is 6 tokens; with --max-new-tokens 5 that "
                                           "exceeds the 10 positions of tiny"):
        check_generation_lengths(lm, [[1] * 4, [1] * 6], max_new_tokens=5)


@pytest.fixture(scope="module")
def lm(tiny_qwen):
    from saediff.models import load_model

    return load_model(tiny_qwen)


def _answers(records):
    return [r["answer"] for r in records]


def test_generate_answers_records_and_per_prompt_seeding(lm):
    a, b, c = ({"id": k, "prompt": p, "topic": "money"} for k, p in
               (("a", "how can i save money ?"), ("b", "what is good food ?"), ("c", "hello")))
    recs = generate_answers(lm, [a, b], samples=3, max_new_tokens=5, seed=4)
    assert [(r["id"], r["sample"]) for r in recs] == [("a", 0), ("a", 1), ("a", 2),
                                                       ("b", 0), ("b", 1), ("b", 2)]
    assert recs[3]["question"] == "what is good food ?" and recs[0]["topic"] == "money"
    assert _answers(recs) == _answers(generate_answers(lm, [a, b], 3, 5, seed=4))
    assert _answers(recs) != _answers(generate_answers(lm, [a, b], 3, 5, seed=5))
    # prompt 1's answers do not depend on what prompt 0 was (each prompt is seeded on its own)
    other = generate_answers(lm, [c, b], samples=3, max_new_tokens=5, seed=4)
    assert _answers(other)[3:] == _answers(recs)[3:]
    greedy = generate_answers(lm, [a], samples=3, max_new_tokens=5, temperature=0)
    assert len(set(_answers(greedy))) == 1


def test_generate_answers_enters_the_context_around_generation(lm):
    seen = []

    @contextlib.contextmanager
    def ctx():
        seen.append("enter")
        yield
        seen.append("exit")

    real = lm.model.generate

    def spy(*args, **kwargs):
        seen.append("generate")
        return real(*args, **kwargs)

    lm.model.generate = spy
    try:
        generate_answers(lm, [{"prompt": "hello"}], samples=2, max_new_tokens=2, batch_size=1,
                         context=ctx())
    finally:
        del lm.model.generate
    assert seen == ["enter", "generate", "generate", "exit"]
