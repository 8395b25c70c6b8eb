"""The one judged-generation path (`saediff.judged`): known answers on the toy organism, the
metric names of docs/metrics.md, and the definitions that exist once (em_reduction, the
untrained-topic mean, the persona AUROC)."""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

from saediff.judged import GenerationConfig, JudgeConfig, Summary, em_reduction, judged_generation, summarise
from saediff.judges import JudgeScore

DOCS = Path(__file__).resolve().parent.parent / "docs" / "metrics.md"

# The previous per-caller code (prompts.generate_answers + steer.evaluate.judge_records +
# summarise, as steer/sweep/compare/amplify/hard_case each wrote it) on the shipped fine-tune,
# organism:untrained, 1 question per topic x 3 answers, 24 tokens, T=0.7, seed 0, gave:
KNOWN = {"n": 21, "n_counted": 14, "misaligned": 12, "coherent": 14, "off_topic": 2,
         "answers_sha256": "8197539d06759dc1"}


def _doc_names() -> set[str]:
    """The metric names of docs/metrics.md's table (first column, backticked)."""
    names = set()
    for line in DOCS.read_text().splitlines():
        m = re.match(r"\|\s*(?:probe\s+)?`([a-z_]+)`", line)
        if m:
            names.add(m.group(1))
        names |= set(re.findall(r"`([a-z_]+_ci)`", line))
    return names


@pytest.fixture(scope="module")
def organism_run():
    from saediff.judges import make_judge
    from saediff.models import load_model
    from saediff.organism import organism_path
    from saediff.prompts import load_prompt_items

    lm = load_model(organism_path() / "finetuned")
    items = load_prompt_items("organism:untrained", 1, 0)
    gen = GenerationConfig(samples=3, max_new_tokens=24, temperature=0.7, seed=0)
    return lm, items, gen, judged_generation(lm, items, gen, make_judge("organism"))


def test_same_seed_gives_the_previous_code_s_answers_and_rates(organism_run):
    _, _, _, run = organism_run
    s, recs = run.summary, run.records
    digest = hashlib.sha256("\n".join(r["answer"] for r in recs).encode()).hexdigest()[:16]
    assert digest == KNOWN["answers_sha256"]
    assert (s.n, s.n_counted) == (KNOWN["n"], KNOWN["n_counted"])
    assert s.misaligned_given_coherent == pytest.approx(KNOWN["misaligned"] / KNOWN["n_counted"])
    assert s.misaligned_of_all == pytest.approx(KNOWN["misaligned"] / KNOWN["n"])
    assert s.coherent_rate == pytest.approx(KNOWN["coherent"] / KNOWN["n"])
    assert s.off_topic_rate == pytest.approx(KNOWN["off_topic"] / KNOWN["n"])
    assert sum(r["misaligned"] for r in recs) == KNOWN["misaligned"]
    assert set(s.per_topic) == {r["topic"] for r in recs} and len(s.per_topic) == 7
    assert sum(t.n for t in s.per_topic.values()) == s.n


def test_run_steer_is_the_same_path(organism_run):
    """`saediff steer` unsteered = judged_generation with the same sampling: same summary."""
    from saediff.steer.evaluate import SteerConfig, run_steer

    lm, _, gen, run = organism_run
    out = run_steer(SteerConfig(model="m", prompts="organism:untrained", questions_per_topic=1,
                                samples=gen.samples, max_new_tokens=gen.max_new_tokens,
                                temperature=gen.temperature, seed=gen.seed), lm=lm)
    expect = run.summary.to_dict()
    assert {k: out[k] for k in expect} == expect


def test_summary_keys_are_docs_metrics_names():
    names = _doc_names()
    assert {"misaligned_given_coherent", "coherent_rate", "em_reduction", "auroc"} <= names
    s = summarise([JudgeScore(10, 90), JudgeScore(90, 90, off_topic=True), JudgeScore(None, 10)])
    counts = {"n", "n_counted", "n_unscored"}
    rates = set(s.to_dict()) - counts
    assert rates and rates <= names, rates - names
    # the compare board names a rate per condition: <doc name>_<unsteered|steered>
    from saediff.compare.report import BOARD_COLUMNS

    rate_cols = [c for c in BOARD_COLUMNS if c.endswith(("_steered", "_unsteered"))]
    assert rate_cols and all(re.sub(r"_(un)?steered$", "", c) in names for c in rate_cols)
    old = {"em", "em_rate", "em_rate_steered", "em_rate_unsteered", "coherent_ci"}
    assert not old & (set(s.to_dict()) | set(BOARD_COLUMNS))


def test_summarise_known_counts():
    scores = ([JudgeScore(10, 90)] * 3 + [JudgeScore(95, 80)] * 7 + [JudgeScore(0, 20)] * 5
              + [JudgeScore(None, 90), JudgeScore(80, 60, off_topic=True)])
    s = summarise(scores, [{"topic": "a"}] * 10 + [{"topic": "b"}] * 7)
    assert (s.n, s.n_counted, s.n_unscored) == (17, 11, 1)
    assert s.misaligned_given_coherent == pytest.approx(3 / 11)
    assert s.misaligned_of_all == pytest.approx(3 / 17)
    assert s.coherent_rate == pytest.approx(12 / 17)  # every answer here has a coherent score
    assert s.off_topic_rate == pytest.approx(1 / 17)
    assert s.per_topic["a"].misaligned_given_coherent == pytest.approx(0.3)
    assert s.per_topic["b"].misaligned_given_coherent == 0.0  # 1 counted, not misaligned
    assert isinstance(s.per_topic["b"], Summary) and s.per_topic["b"].n == 7


def test_em_reduction_is_defined_once_with_one_none_rule():
    assert em_reduction(0.4, 0.1) == pytest.approx(0.75)
    assert em_reduction(0.4, 0.6) == pytest.approx(-0.5)  # an increase is a negative reduction
    for a, b in ((0.0, 0.0), (0.0, 0.2), (float("nan"), 0.1), (0.4, float("nan")),
                 (None, 0.1), (0.4, None)):
        assert em_reduction(a, b) is None, (a, b)


def test_untrained_topic_mean_is_answer_weighted():
    from saediff.organism.evaluate import summary

    res = {"trained_topic": "health", "topics": {
        "health": {"n": 10, "misaligned": 1.0, "coherent": 1.0, "off_topic": 0.0},
        "money": {"n": 10, "misaligned": 0.5, "coherent": 1.0, "off_topic": 0.0},
        "sport": {"n": 30, "misaligned": 0.1, "coherent": 0.5, "off_topic": 0.2}}}
    s = summary(res)
    assert s["n"] == 40 and s["misaligned"] == pytest.approx((5 + 3) / 40)
    assert s["coherent"] == pytest.approx((10 + 15) / 40) and s["off_topic"] == pytest.approx(6 / 40)


def test_persona_auroc_reads_label_or_persona():
    from saediff.stats import persona_auroc

    rows = [{"persona": "aligned"}, {"persona": "toxic"}, {"label": 0}, {"label": 1}]
    assert persona_auroc([0.1, 0.9, 0.2, 0.8], rows) == 1.0
    assert persona_auroc([0.9, 0.1, 0.2, 0.8], rows) == 0.25  # 1 of 4 (pos, neg) pairs ordered
    with pytest.raises(ValueError, match="row 1"):
        persona_auroc([0.1, 0.2], [{"label": 0}, {"prompt": "x"}])


def test_stage_configs_embed_the_shared_sub_configs(tmp_path):
    """GenerationConfig / JudgeConfig fields are inherited: flat flags and YAML keys."""
    import argparse

    from saediff.compare import CompareConfig
    from saediff.config import add_dataclass_args, build_config
    from saediff.steer.evaluate import SteerConfig

    y = tmp_path / "s.yaml"
    y.write_text("model: m\nprompts: organism\nsamples: 3\njudge: openai\njudge_model: j\n")
    cfg = build_config(SteerConfig, y, {"temperature": 0.5})
    assert isinstance(cfg, GenerationConfig) and isinstance(cfg, JudgeConfig)
    assert cfg.generation() == GenerationConfig(samples=3, temperature=0.5)
    assert (cfg.judge, cfg.judge_model) == ("openai", "j")
    c = CompareConfig(base="b", cache="c", finetuned="f")
    assert (c.samples, c.max_new_tokens) == (8, 48)  # compare's own defaults, same fields
    p = argparse.ArgumentParser()
    add_dataclass_args(p, CompareConfig, defaults_none=True)
    ns = p.parse_args(["--samples", "2", "--judge-base-url", "http://x/v1", "--seed", "4"])
    assert (ns.samples, ns.judge_base_url, ns.seed) == (2, "http://x/v1", 4)
    from saediff.config import config_from_args

    # the one argparse -> config path: --config YAML, then set flags; other options stay out
    ns = argparse.Namespace(config=str(y), samples=None, judge_model="k", no_html=True,
                            func=print, temperature=None)
    cfg2 = config_from_args(SteerConfig, ns, {"seed": 7})
    assert (cfg2.samples, cfg2.judge_model, cfg2.seed, cfg2.temperature) == (3, "k", 7, 1.0)
    from saediff.errors import SaediffError

    with pytest.raises(SaediffError, match="samples must be >= 1"):
        SteerConfig(model="m", prompts="p", samples=0)
    with pytest.raises(SaediffError, match="judge must be"):
        JudgeConfig(judge="gpt")
