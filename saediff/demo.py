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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from saediff.demo_report import finding, format_summary, summary_rows, write_report
from saediff.io import write_json, write_jsonl
from saediff.organism.evaluate import DEFAULT_TEMPERATURE

log = logging.getLogger(__name__)
__all__ = ["DemoConfig", "finding", "format_summary", "run_demo", "summary_rows"]


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
    answers_per_topic: int | None = None
    """Answers judged per topic in the organism evals (default 100; quick 16); the steer runs
    sample a tenth of it per question."""
    seed: int = 0
    """Seed for corpus, sampling and training."""
    organism: str | None = None
    """Organism directory (default: the shipped one; or one from `saediff organism build`)."""

    def __post_init__(self) -> None:
        if self.answers_per_topic is not None and self.answers_per_topic < 1:
            raise ValueError(f"answers_per_topic must be >= 1, got {self.answers_per_topic}")
        if self.organism is not None and not (Path(self.organism) / "organism.json").is_file():
            raise ValueError(f"organism: no organism.json in {self.organism!r}")


def _configs_dir() -> Path:
    here = Path("configs")
    return here if here.is_dir() else Path(__file__).resolve().parent.parent / "configs"


def _show(echo: Callable[[str], None], stage: str, argv: list[str]) -> None:
    """Echo the CLI command equivalent to the library call the demo makes next."""
    echo(f"\n$ saediff {stage} {shlex.join(argv)}")


def _with_ci(rate: float, n: int) -> tuple[float, list[float]]:
    """A pooled share of n answers and its Wilson 95% interval."""
    from saediff.judges import wilson

    return rate, list(wilson(round(rate * n), n))


@dataclass
class _Ctx:
    """What every step of the demo reads: its config, paths and the summary being filled."""

    cfg: DemoConfig
    echo: Callable[[str], None]
    org: Path
    out: Path
    layer: int
    per_topic: int
    cache: str
    train_cfg: str
    summary: dict[str, Any]


def run_demo(cfg: DemoConfig, echo: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the pipeline; `echo` receives the commands and progress lines (default: logging)."""
    t0 = time.time()
    ctx = _setup(cfg, echo or log.info)
    _organism_step(ctx)
    _cache_step(ctx)
    sae_dir = _train_step(ctx)
    top = _diff_step(ctx, sae_dir)
    _steer_step(ctx, sae_dir, top)
    ctx.summary["finding"] = finding(ctx.summary)
    ctx.summary["seconds"] = round(time.time() - t0, 1)
    write_json(ctx.out / "summary.json", ctx.summary)
    write_report(ctx.out, ctx.out / "diff", ctx.summary)
    return ctx.summary


def _setup(cfg: DemoConfig, echo: Callable[[str], None]) -> _Ctx:
    """The organism, its layer and the demo's output paths."""
    from saediff.organism import metadata, organism_path

    org = Path(cfg.organism) if cfg.organism else organism_path()
    meta = metadata(org)
    layer = int(meta.get("recommended_layer", meta.get("layer", 1)))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    q = cfg.quick
    # under OUT, so the demo never shares a path with the README's stage-by-stage commands
    cache = cfg.cache or str(out / f"cache_l{layer}{'_quick' if q else ''}.h5")
    return _Ctx(cfg=cfg, echo=echo, org=org, out=out, layer=layer,
                per_topic=cfg.answers_per_topic or (16 if q else 100), cache=cache,
                train_cfg=cfg.train_config or str(_configs_dir() / "toy_topk.yaml"),
                summary={"quick": q, "layer": layer, "organism": str(org)})


def _organism_step(ctx: _Ctx) -> None:
    """1. The organism: misalignment before and after the narrow fine-tune (untrained topics)."""
    from saediff.models import load_model
    from saediff.organism.evaluate import evaluate, summary

    s = ctx.summary
    for name in ("base", "finetuned"):
        _show(ctx.echo, "organism", ["eval", "--model", str(ctx.org / name), "--answers-per-topic",
                                     str(ctx.per_topic), "--seed", str(ctx.cfg.seed), "--json"])
        ev = evaluate(load_model(ctx.org / name), ctx.per_topic, seed=ctx.cfg.seed)
        write_json(ctx.out / f"organism_eval_{name}.json", ev)
        s["trained_topic"] = ev["trained_topic"]
        pooled = summary(ev)  # the one untrained-topic mean (answer-weighted)
        n = pooled["n"]
        s[f"misaligned_rate_{name}"], s[f"misaligned_rate_{name}_ci"] = _with_ci(pooled["misaligned"], n)
        s[f"coherent_rate_{name}"], s[f"coherent_rate_{name}_ci"] = _with_ci(pooled["coherent"], n)
        s[f"off_topic_rate_{name}"], s["n_eval"] = pooled["off_topic"], n


def _cache_step(ctx: _Ctx) -> None:
    """2. Cache both models on the organism's chat corpus (prompt/response role masks)."""
    from saediff.cache import CacheConfig, build_cache
    from saediff.organism.grammar import corpus_records

    q, seed = ctx.cfg.quick, ctx.cfg.seed
    corpus = ctx.out / "corpus.jsonl"
    n_conv = 1500 if q else 6000
    _show(ctx.echo, "organism", ["corpus", "--out", str(corpus), "--n", str(n_conv),
                                 "--seed", str(seed + 1), "--max-turns", "1"])
    write_jsonl(corpus, corpus_records(n_conv, seed + 1, max_turns=1))
    cache_kw = dict(base=str(ctx.org / "base"), finetuned=str(ctx.org / "finetuned"),
                    layer=ctx.layer, dataset=str(corpus), prompt_field="prompt",
                    response_field="response", max_tokens=60_000 if q else 400_000, ctx_len=128,
                    batch_size=32, out=ctx.cache)
    _show(ctx.echo, "cache", _flags(cache_kw))
    path = Path(ctx.cache)
    before = path.stat().st_mtime_ns if path.exists() else None
    build_cache(CacheConfig(**cache_kw))
    if before is not None and path.stat().st_mtime_ns == before:
        ctx.echo(f"(reusing {ctx.cache}: complete, with the same models, layer and dataset)")


def _train_step(ctx: _Ctx) -> Path:
    """3. Train the SAE on both sources (reused when its inputs are unchanged)."""
    from saediff.config import build_config
    from saediff.train import TrainConfig, train

    cfg, q = ctx.cfg, ctx.cfg.quick
    sae_dir = ctx.out / "sae"
    inputs = _sae_inputs(ctx.cache, ctx.train_cfg, cfg.seed, q)
    stamp = sae_dir / "demo_inputs.json"
    if (sae_dir / "evals.json").exists() and stamp.exists() and json.loads(stamp.read_text()) == inputs:
        ctx.echo(f"\n(reusing the trained SAE in {sae_dir}; delete it to retrain)")
    else:
        if sae_dir.exists():  # trained on another cache or config: start again
            ctx.echo(f"\n({sae_dir} was trained on other inputs; retraining)")
            shutil.rmtree(sae_dir)
        over: dict[str, Any] = {"cache": [ctx.cache], "out": str(sae_dir), "seed": cfg.seed}
        if q:
            over["total_tokens"] = 1_500_000
        _show(ctx.echo, "train", ["--config", ctx.train_cfg, "--cache", ctx.cache, "--out",
                                  str(sae_dir), "--seed", str(cfg.seed)]
              + (["--total-tokens", "1500000"] if q else []))
        train(build_config(TrainConfig, ctx.train_cfg, over))
        write_json(stamp, inputs)
    sae_evals = json.loads((sae_dir / "evals.json").read_text())
    ctx.summary["sae_fvu"] = {src: ev["fvu"] for src, ev in sae_evals.items()}
    ctx.summary["sae_l0"] = {src: ev["l0"] for src, ev in sae_evals.items()}
    return sae_dir


def _diff_step(ctx: _Ctx, sae_dir: Path) -> dict[str, Any]:
    """4. Diff on the fine-tuned model's own answers to held-out questions (the published
    way); the top latent's persona AUROC. Returns the top row of the ranking."""
    from saediff.diff import DiffConfig, run_diff
    from saediff.judges import judge_labeler, make_judge

    res = run_diff(DiffConfig(**_diff_kwargs(ctx, sae_dir)),
                   labeler=judge_labeler(make_judge("organism")))
    res.to_dir(ctx.out / "diff")
    ctx.echo(res.format_table(10))
    top, s = res.table[0], ctx.summary
    s["top_latent"] = int(top["latent"])
    s["top_latent_mean_shift"] = top["mean_shift"]
    s["top_latent_direction"] = top.get("direction")
    auc, n = persona_auroc(ctx.org, sae_dir, ctx.layer, s["top_latent"])
    s["top_latent_auroc"], s["top_latent_auroc_n"] = auc, n
    s["top_latent_separation"] = max(auc, 1.0 - auc)  # sign-free: separates either way
    ev0 = res.evidence[0] if res.evidence else {}
    s["top_latent_answer_auroc"] = ev0.get("auroc_labels")
    s["top_latent_answer_auroc_n"] = ev0.get("auroc_labels_n")
    directions = ctx.out / "diff" / "directions.json"
    if directions.exists():
        s["directions"] = json.loads(directions.read_text())
    return top


def _diff_kwargs(ctx: _Ctx, sae_dir: Path) -> dict[str, Any]:
    """The diff's config (echoed as its CLI command): held-out prompts written to OUT."""
    from saediff.organism import TOPICS, heldout_questions

    q, org = ctx.cfg.quick, ctx.org
    prompts = ctx.out / "diff_prompts.jsonl"
    write_jsonl(prompts, [{"prompt": qn, "topic": t} for t in TOPICS
                          for qn in heldout_questions(t, 3 if q else 6, seed=ctx.cfg.seed)])
    kw: dict[str, Any] = dict(
        base=str(org / "base"), finetuned=[str(org / "finetuned")], sae=str(sae_dir),
        layer=ctx.layer, prompts=str(prompts), responses_from="finetuned",
        samples=2 if q else 3, temperature=DEFAULT_TEMPERATURE, tokens="response",
        out=str(ctx.out / "diff"), seed=ctx.cfg.seed)
    if (org / "adapter").is_dir():  # rank-1 on the SAE's layer: its B vector joins the table
        kw["lora_adapter"] = [str(org / "adapter")]
    if q:
        kw["n_boot"] = 200
    _show(ctx.echo, "diff", _flags(kw) + ["--judge", "organism"])
    return kw


def _steer_step(ctx: _Ctx, sae_dir: Path, top: dict[str, Any]) -> None:
    """5. Clamp the top latent to 0 in the fine-tuned model (untrained topics); 6. clamp it
    *up* in the base model, to its typical activation where it fires on the fine-tune's answers."""
    from saediff.judged import em_reduction
    from saediff.steer.evaluate import SteerConfig, run_steer

    s, q = ctx.summary, ctx.cfg.quick

    def steer_run(model: str, tag: str, out_dir: str, clamp: float | None) -> None:
        kw: dict[str, Any] = dict(
            model=str(ctx.org / model), sae=str(sae_dir), prompts="organism:untrained",
            questions_per_topic=4 if q else 10, samples=max(2, ctx.per_topic // 10),
            judge="organism", temperature=DEFAULT_TEMPERATURE, seed=ctx.cfg.seed,
            out=str(ctx.out / out_dir))
        if clamp is not None:
            kw.update(latent=[s["top_latent"]], clamp=clamp)
        _show(ctx.echo, "steer", _flags(kw))
        _steer_rates(s, tag, run_steer(SteerConfig(**kw)))

    steer_run("finetuned", "unsteered", "steer_unsteered", None)
    steer_run("finetuned", "steered", "steer_steered", 0.0)
    up = round(float(top.get("typical_act") or 1.0), 3)
    steer_run("base", "base_clamped_up", "steer_base_up", up)
    s["base_clamp_value"] = up
    s["em_reduction"] = em_reduction(s["misaligned_given_coherent_unsteered"],
                                     s["misaligned_given_coherent_steered"])


def _flags(kw: dict[str, Any]) -> list[str]:
    """`--key value` per keyword argument (a list's first item), for the echoed command."""
    return [a for k, v in kw.items()
            for a in (f"--{k.replace('_', '-')}", str(v[0] if isinstance(v, list) else v))]


def _steer_rates(summary: dict[str, Any], tag: str, run: dict[str, Any]) -> None:
    """A steer run's two rates, each with its Wilson 95% interval, and its answer count."""
    summary[f"misaligned_given_coherent_{tag}"] = run["misaligned_given_coherent"]
    summary[f"misaligned_given_coherent_{tag}_ci"] = run["misaligned_given_coherent_ci"]
    summary[f"coherent_rate_{tag}"] = run["coherent_rate"]
    summary[f"coherent_rate_{tag}_ci"] = run["coherent_rate_ci"]
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


def persona_auroc(org: Path, sae_dir: Path, layer: int, latent: int,
                  model: str = "base") -> tuple[float, int]:
    """(AUROC, n): a latent's mean response-token activation per labelled held-out
    conversation of the organism, read in `model`, scored by `saediff.stats.persona_auroc`."""
    import torch

    from saediff.diff.differ import latent_activations
    from saediff.models import ROLE_RESPONSE, encode_chat, load_model
    from saediff.organism import load_heldout_labelled
    from saediff.sae import load_sae
    from saediff.stats import persona_auroc as auroc_of_rows

    lm, sae = load_model(org / model), load_sae(sae_dir)
    recs = load_heldout_labelled(org)
    enc = [encode_chat(lm.tokenizer, r["prompt"], r["response"]) for r in recs]
    acts = latent_activations(lm, sae, layer, [[ids for ids, _ in enc[i:i + 32]]
                                               for i in range(0, len(enc), 32)])
    scores = [a[torch.tensor(roles) == ROLE_RESPONSE, latent].mean().item()
              for a, (_, roles) in zip(acts, enc)]
    return auroc_of_rows(scores, recs), len(recs)
