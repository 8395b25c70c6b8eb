"""`saediff demo`: the whole pipeline on the built-in organism, through the library's stage functions.

organism eval (base, fine-tuned) -> corpus -> cache (both models) -> train (TopK SAE) ->
diff (the fine-tuned model's own answers; LoRA B and diff-in-means directions) -> steer (clamp
the top latent to 0 in the fine-tuned model, and up in the base) -> summary.json + report.html.
Stages whose outputs exist with the same inputs are reused, and the demo says so.
"""
from __future__ import annotations

import json
import logging
import shlex
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from saediff.io import write_json, write_jsonl, write_text

log = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    out: str = "demo_out"
    """Output directory (summary.json, report.html and each stage's outputs)."""
    quick: bool = False
    """Reduced sizes for a smoke run (~25 s instead of ~4 min): fewer tokens, steps, samples."""
    cache: str | None = None
    """Activation cache path (default: OUT/cache_l{layer}[_quick].h5)."""
    train_config: str | None = None
    """SAE training config (default: configs/toy_topk.yaml)."""
    samples: int | None = None
    """Answers judged per topic in the evals (default 100; quick 16)."""
    seed: int = 0
    """Seed for corpus, sampling and training."""
    organism: str | None = None
    """Organism directory (default: the shipped one; or one from `saediff organism build`)."""

    def __post_init__(self) -> None:
        if self.samples is not None and self.samples < 1:
            raise ValueError(f"samples must be >= 1, got {self.samples}")
        if self.organism is not None and not (Path(self.organism) / "organism.json").is_file():
            raise ValueError(f"organism: no organism.json in {self.organism!r}")


def _configs_dir() -> Path:
    here = Path("configs")
    return here if here.is_dir() else Path(__file__).resolve().parent.parent / "configs"


def _show(echo: Callable[[str], None], stage: str, argv: list[str]) -> None:
    """Echo the CLI command equivalent to the library call the demo makes next."""
    echo(f"\n$ saediff {stage} {shlex.join(argv)}")


def _untrained_rate(result: dict[str, Any]) -> tuple[float, float, float, int]:
    """(misaligned, coherent, off_topic, n answers) pooled over topics not fine-tuned."""
    rows = [v for t, v in result["topics"].items() if t != result["trained_topic"]]
    n = sum(r["n"] for r in rows)
    rates = [sum(r[k] * r["n"] for r in rows) / n for k in ("misaligned", "coherent", "off_topic")]
    return rates[0], rates[1], rates[2], n


def _with_ci(rate: float, n: int) -> tuple[float, list[float]]:
    """A pooled share of n answers and its Wilson 95% interval."""
    from saediff.judges import wilson

    return rate, list(wilson(round(rate * n), n))


def run_demo(cfg: DemoConfig, echo: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the pipeline; `echo` receives the commands and progress lines (default: logging)."""
    from saediff.organism import metadata, organism_path

    echo = echo or log.info
    t0 = time.time()
    org = Path(cfg.organism) if cfg.organism else organism_path()
    meta = metadata(org)
    layer = int(meta.get("recommended_layer", meta.get("layer", 1)))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    q = cfg.quick
    samples = cfg.samples or (16 if q else 100)
    # under OUT, so the demo never shares a path with the README's stage-by-stage commands
    cache = cfg.cache or str(out / f"cache_l{layer}{'_quick' if q else ''}.h5")
    train_cfg = cfg.train_config or str(_configs_dir() / "toy_topk.yaml")
    summary: dict[str, Any] = {"quick": q, "layer": layer, "organism": str(org)}

    # 1. the organism: misalignment before and after the narrow fine-tune
    from saediff.models import load_model
    from saediff.organism.evaluate import evaluate

    evals = {}
    for name in ("base", "finetuned"):
        _show(echo, "organism", ["eval", "--model", str(org / name), "--samples", str(samples),
                                 "--seed", str(cfg.seed), "--json"])
        evals[name] = evaluate(load_model(org / name), samples, seed=cfg.seed)
        write_json(out / f"organism_eval_{name}.json", evals[name])
    summary["trained_topic"] = evals["base"]["trained_topic"]
    for name in ("base", "finetuned"):
        em, coh, off, n = _untrained_rate(evals[name])
        summary[f"misaligned_rate_{name}"], summary[f"misaligned_rate_{name}_ci"] = _with_ci(em, n)
        summary[f"coherent_rate_{name}"], summary[f"coherent_rate_{name}_ci"] = _with_ci(coh, n)
        summary[f"off_topic_rate_{name}"], summary["n_eval"] = off, n

    # 2. cache both models on the organism's chat corpus (prompt/response role masks)
    from saediff.cache import CacheConfig, build_cache
    from saediff.organism.grammar import corpus_records

    corpus = out / "corpus.jsonl"
    n_conv = 1500 if q else 6000
    _show(echo, "organism", ["corpus", "--out", str(corpus), "--n", str(n_conv),
                             "--seed", str(cfg.seed + 1), "--max-turns", "1"])
    write_jsonl(corpus, corpus_records(n_conv, cfg.seed + 1, max_turns=1))
    cache_kw = dict(base=str(org / "base"), finetuned=str(org / "finetuned"), layer=layer,
                    dataset=str(corpus), prompt_field="prompt", response_field="response",
                    max_tokens=60_000 if q else 400_000, ctx_len=128, batch_size=32, out=cache)
    _show(echo, "cache", [a for k, v in cache_kw.items() for a in (f"--{k.replace('_', '-')}", str(v))])
    before = Path(cache).stat().st_mtime_ns if Path(cache).exists() else None
    build_cache(CacheConfig(**cache_kw))
    if before is not None and Path(cache).stat().st_mtime_ns == before:
        echo(f"(reusing {cache}: complete, with the same models, layer and dataset)")

    # 3. train the SAE on both sources
    from saediff.config import build_config
    from saediff.train import TrainConfig, train

    sae_dir = out / "sae"
    inputs = _sae_inputs(cache, train_cfg, cfg.seed, q)
    stamp = sae_dir / "demo_inputs.json"
    if (sae_dir / "evals.json").exists() and stamp.exists() and json.loads(stamp.read_text()) == inputs:
        echo(f"\n(reusing the trained SAE in {sae_dir}; delete it to retrain)")
    else:
        if sae_dir.exists():  # trained on another cache or config: start again
            echo(f"\n({sae_dir} was trained on other inputs; retraining)")
            shutil.rmtree(sae_dir)
        over: dict[str, Any] = {"cache": [cache], "out": str(sae_dir), "seed": cfg.seed}
        if q:
            over["total_tokens"] = 1_500_000
        _show(echo, "train", ["--config", train_cfg, "--cache", cache, "--out", str(sae_dir),
                              "--seed", str(cfg.seed)] + (["--total-tokens", "1500000"] if q else []))
        train(build_config(TrainConfig, train_cfg, over))
        write_json(stamp, inputs)
    sae_evals = json.loads((sae_dir / "evals.json").read_text())
    summary["sae_fvu"] = {src: ev["fvu"] for src, ev in sae_evals.items()}
    summary["sae_l0"] = {src: ev["l0"] for src, ev in sae_evals.items()}

    # 4. diff on the fine-tuned model's own answers to held-out questions (the published way)
    from saediff.diff import DiffConfig, run_diff
    from saediff.judges import judge_labeler, make_judge
    from saediff.organism import TOPICS, heldout_questions, load_heldout_labelled

    diff_dir = out / "diff"
    prompts = out / "diff_prompts.jsonl"
    write_jsonl(prompts, [{"prompt": qn, "topic": t} for t in TOPICS
                          for qn in heldout_questions(t, 3 if q else 6, seed=cfg.seed)])
    diff_kw: dict[str, Any] = dict(
        base=str(org / "base"), finetuned=[str(org / "finetuned")], sae=str(sae_dir), layer=layer,
        prompts=str(prompts), responses_from="finetuned", samples=2 if q else 3, temperature=0.7,
        tokens="response", out=str(diff_dir), seed=cfg.seed)
    if (org / "adapter").is_dir():  # rank-1 on the SAE's layer: its B vector joins the table
        diff_kw["lora_adapter"] = [str(org / "adapter")]
    if q:
        diff_kw["n_boot"] = 200
    _show(echo, "diff", [a for k, v in diff_kw.items() for a in
                         (f"--{k.replace('_', '-')}", str(v[0] if isinstance(v, list) else v))]
          + ["--judge", "organism"])
    res = run_diff(DiffConfig(**diff_kw), labeler=judge_labeler(make_judge("organism")))
    res.to_dir(diff_dir)
    echo(res.format_table(10))
    top = res.table[0]
    summary["top_latent"] = int(top["latent"])
    summary["top_latent_mean_shift"] = top["mean_shift"]
    summary["top_latent_direction"] = top.get("direction")
    auc = persona_auroc(org, sae_dir, layer, summary["top_latent"])
    summary["top_latent_auroc"] = auc
    summary["top_latent_auroc_n"] = len(load_heldout_labelled(org))
    summary["top_latent_separation"] = max(auc, 1.0 - auc)  # sign-free: separates either way
    ev0 = res.evidence[0] if res.evidence else {}
    summary["top_latent_answer_auroc"] = ev0.get("auroc_labels")
    summary["top_latent_answer_auroc_n"] = ev0.get("auroc_labels_n")
    directions = diff_dir / "directions.json"
    if directions.exists():
        summary["directions"] = json.loads(directions.read_text())

    # 5. steer: clamp the top latent to 0 in the fine-tuned model, untrained topics
    from saediff.steer.evaluate import SteerConfig, run_steer

    def steer_run(model: str, tag: str, clamp: float | None) -> dict[str, Any]:
        kw: dict[str, Any] = dict(
            model=str(org / model), sae=str(sae_dir), prompts="organism:untrained",
            questions_per_topic=4 if q else 10, samples=max(2, samples // 10), judge="organism",
            temperature=0.7, seed=cfg.seed, out=str(out / f"steer_{tag}"))
        if clamp is not None:
            kw.update(latent=[summary["top_latent"]], clamp=clamp)
        _show(echo, "steer", [a for k, v in kw.items() for a in
                              (f"--{k.replace('_', '-')}", str(v[0] if isinstance(v, list) else v))])
        return run_steer(SteerConfig(**kw))

    plain, clamped = steer_run("finetuned", "unsteered", None), steer_run("finetuned", "steered", 0.0)
    for tag, run in (("unsteered", plain), ("steered", clamped)):
        _steer_rates(summary, tag, run)
    # 6. the other direction: clamp the same latent *up* in the base model (to its typical
    # activation where it fires on the fine-tuned model's answers)
    up = round(float(top.get("typical_act") or 1.0), 3)
    base_up = steer_run("base", "base_up", up)
    summary["base_clamp_value"] = up
    _steer_rates(summary, "base_clamped_up", base_up)
    before_em = summary["misaligned_given_coherent_unsteered"] or 0.0
    summary["em_reduction"] = (1 - (summary["misaligned_given_coherent_steered"] or 0.0) / before_em
                               if before_em else None)
    summary["finding"] = finding(summary)
    summary["seconds"] = round(time.time() - t0, 1)

    write_json(out / "summary.json", summary)
    _write_report(out, diff_dir, summary)
    return summary


def _steer_rates(summary: dict[str, Any], tag: str, run: dict[str, Any]) -> None:
    """A steer run's two rates, each with its Wilson 95% interval, and its answer count."""
    summary[f"misaligned_given_coherent_{tag}"] = run["misaligned_given_coherent"]
    summary[f"misaligned_given_coherent_{tag}_ci"] = run["misaligned_given_coherent_ci"]
    summary[f"coherent_rate_{tag}"] = run["coherent_rate"]
    summary[f"coherent_rate_{tag}_ci"] = run["coherent_ci"]
    summary[f"n_{tag}"], summary[f"n_coherent_{tag}"] = run["n"], run["n_counted"]


def _sae_inputs(cache: str, train_cfg: str, seed: int, quick: bool) -> dict[str, Any]:
    """What the demo's SAE depends on: the cache's provenance and the training config."""
    import yaml

    from saediff.cache.format import open_cache

    with open_cache(cache) as c:
        prov = {k: c.attrs.get(k) for k in ("layer", "models", "dataset", "max_tokens", "ctx_len")}
    return json.loads(json.dumps({"cache": str(cache), "provenance": prov, "seed": seed,
                                  "quick": quick,
                                  "train_config": yaml.safe_load(Path(train_cfg).read_text())},
                                 default=str))


def persona_auroc(org: Path, sae_dir: Path, layer: int, latent: int, model: str = "base") -> float:
    """AUROC (toxic = positive) of a latent's mean response-token activation, per labelled
    held-out conversation of the organism, read in `model`."""
    import torch

    from saediff.diff.differ import latent_activations
    from saediff.models import ROLE_RESPONSE, encode_chat, load_model
    from saediff.organism import load_heldout_labelled
    from saediff.stats import auroc
    from saediff.sae import load_sae

    lm, sae = load_model(org / model), load_sae(sae_dir)
    recs = load_heldout_labelled(org)
    enc = [encode_chat(lm.tokenizer, r["prompt"], r["response"]) for r in recs]
    acts = latent_activations(lm, sae, layer, [[ids for ids, _ in enc[i:i + 32]]
                                               for i in range(0, len(enc), 32)])
    scores = [a[torch.tensor(roles) == ROLE_RESPONSE, latent].mean().item()
              for a, (_, roles) in zip(acts, enc)]
    return auroc(scores, [r["persona"] == "toxic" for r in recs])


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    if isinstance(v, dict):
        return ", ".join(f"{k}: {_fmt(x)}" for k, x in v.items())
    return "n/a" if v is None else str(v)


def _rate(summary: dict[str, Any], key: str) -> str:
    """`0.458 [0.421, 0.495]`: a rate with its 95% interval (the `KEY_ci` entry)."""
    v, ci = summary.get(key), summary.get(f"{key}_ci")
    if ci is None or v is None:
        return _fmt(v)
    return f"{_fmt(v)} [{ci[0]:.3f}, {ci[1]:.3f}]"


# (summary key, label); labels name each number's data, `{...}` fills in from the summary
SUMMARY_KEYS = [
    ("misaligned_rate_base", "misaligned share of all answers (organism judge), untrained "
                             "topics, n={n_eval} — base"),
    ("misaligned_rate_finetuned", "misaligned share of all answers (organism judge), untrained "
                                  "topics, n={n_eval} — fine-tuned"),
    ("coherent_rate_finetuned", "coherent share, same answers — fine-tuned"),
    ("sae_fvu", "SAE fraction of variance unexplained (per source)"),
    ("sae_l0", "SAE mean L0 (per source)"),
    ("top_latent", "top-ranked latent (largest mean activation shift base → fine-tuned)"),
    ("top_latent_direction", "its shift direction"),
    ("top_latent_auroc", "its persona AUROC (held-out labelled chats, n={top_latent_auroc_n}, "
                         "read in the base; toxic = positive)"),
    ("top_latent_separation", "persona separation either way, max(AUROC, 1 - AUROC)"),
    ("top_latent_answer_auroc", "its answer AUROC (this diff's sampled answers, judge labels, "
                                "n={top_latent_answer_auroc_n}; misaligned = positive)"),
    ("misaligned_given_coherent_unsteered", "misaligned | coherent (EM rate), fine-tuned, "
     "unsteered, {n_coherent_unsteered} coherent of n={n_unsteered}"),
    ("misaligned_given_coherent_steered", "misaligned | coherent (EM rate), fine-tuned, top latent "
     "clamped to 0, {n_coherent_steered} coherent of n={n_steered}"),
    ("coherent_rate_unsteered", "coherent share, fine-tuned, unsteered"),
    ("coherent_rate_steered", "coherent share, fine-tuned, top latent clamped to 0"),
    ("em_reduction", "relative cut in the EM rate by the clamp"),
    ("misaligned_given_coherent_base_clamped_up", "misaligned | coherent (EM rate), base, top "
     "latent clamped up, {n_coherent_base_clamped_up} coherent of n={n_base_clamped_up}"),
    ("coherent_rate_base_clamped_up", "coherent share, base, top latent clamped up"),
]


class _Blank(dict):
    def __missing__(self, key: str) -> str:
        return "?"


def summary_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, value) per summary entry; every rate carries its 95% interval."""
    fill = _Blank({k: _fmt(v) for k, v in summary.items()})
    return [(label.format_map(fill), _rate(summary, key)) for key, label in SUMMARY_KEYS]


def finding(summary: dict[str, Any]) -> str:
    """What the demo found, in one plain sentence (rates with 95% intervals)."""
    auc = summary.get("top_latent_auroc")
    return (f"Fine-tuning on one topic raised the misaligned share on the other topics from "
            f"{_rate(summary, 'misaligned_rate_base')} to "
            f"{_rate(summary, 'misaligned_rate_finetuned')}; latent {summary.get('top_latent')}, "
            f"ranked first by activation shift, tells toxic from aligned held-out chats with "
            f"persona AUROC {_fmt(auc)} (n={summary.get('top_latent_auroc_n')}); clamping it to 0 "
            f"cut misaligned | coherent from {_rate(summary, 'misaligned_given_coherent_unsteered')}"
            f" to {_rate(summary, 'misaligned_given_coherent_steered')} (coherent "
            f"{_rate(summary, 'coherent_rate_unsteered')} → "
            f"{_rate(summary, 'coherent_rate_steered')}), and clamping it up in the base gave "
            f"{_rate(summary, 'misaligned_given_coherent_base_clamped_up')}.")


def format_summary(summary: dict[str, Any]) -> str:
    rows = summary_rows(summary)
    width = max(len(label) for label, _ in rows)
    lines = [f"{label:<{width}}  {value}" for label, value in rows]
    return "\n".join([summary.get("finding") or finding(summary), "", *lines])


def _write_report(out: Path, diff_dir: Path, summary: dict[str, Any]) -> None:
    """report.html = the diff report with the demo's summary table on top."""
    import html

    rows = "".join(f"<tr><td>{html.escape(label)}</td><td><b>{html.escape(value)}</b></td></tr>"
                   for label, value in summary_rows(summary))
    block = (f"<section id='demo-summary'><h1>saediff demo — toy organism of emergent misalignment"
             f"</h1><p>{html.escape(summary.get('finding') or finding(summary))}</p>"
             f"<table>{rows}</table></section>")
    src = diff_dir / "report.html"
    target = out / "report.html"
    if src.exists():
        text = src.read_text()
        i = text.find("<body")
        j = text.find(">", i) + 1 if i >= 0 else 0
        write_text(target, text[:j] + block + text[j:])
    else:
        write_text(target, f"<!doctype html><html><body>{block}</body></html>")
