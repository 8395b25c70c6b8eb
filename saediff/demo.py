"""`saediff demo`: the whole pipeline on the built-in organism, through the same CLI stages.

organism eval (base, fine-tuned) -> corpus -> cache (both models) -> train (TopK SAE) ->
diff (the fine-tuned model's own answers; LoRA B and diff-in-means directions) -> steer (clamp
the top latent to 0 in the fine-tuned model, and up in the base) -> summary.json + report.html.
Stages whose outputs exist with the same inputs are reused, and the demo says so.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import shlex
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    out: str = "demo_out"
    """Output directory (summary.json, report.html and each stage's outputs)."""
    quick: bool = False
    """Reduced sizes for a smoke run (a few minutes): fewer tokens, steps and samples."""
    cache: str | None = None
    """Activation cache path (default: activations_cache/organism_l{layer}[_quick].h5)."""
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


def _run(stage: str, argv: list[str], echo: Callable[[str], None], capture: bool = False) -> str:
    """Run `saediff <stage> argv...` in-process, echoing the command line."""
    import importlib

    echo(f"\n$ saediff {stage} {shlex.join(argv)}")
    module = importlib.import_module(f"saediff.cli.{stage}")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf) if capture else contextlib.nullcontext():
        rc = module.main(argv)
    if rc:
        raise RuntimeError(f"saediff {stage} exited with {rc}")
    return buf.getvalue()


def _untrained_rate(result: dict[str, Any]) -> tuple[float, float, float]:
    """(misaligned, coherent, off_topic) pooled over topics that were not fine-tuned."""
    rows = [v for t, v in result["topics"].items() if t != result["trained_topic"]]
    n = sum(r["n"] for r in rows)
    return tuple(sum(r[k] * r["n"] for r in rows) / n for k in ("misaligned", "coherent", "off_topic"))


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
    cache = cfg.cache or f"activations_cache/organism_l{layer}{'_quick' if q else ''}.h5"
    train_cfg = cfg.train_config or str(_configs_dir() / "toy_topk.yaml")
    summary: dict[str, Any] = {"quick": q, "layer": layer, "organism": str(org)}

    # 1. the organism: misalignment before and after the narrow fine-tune
    evals = {}
    for name in ("base", "finetuned"):
        text = _run("organism", echo=echo,
                    argv=["eval", "--model", str(org / name), "--samples", str(samples),
                          "--seed", str(cfg.seed), "--json"], capture=True)
        evals[name] = json.loads(text)
        (out / f"organism_eval_{name}.json").write_text(json.dumps(evals[name], indent=2))
    summary["trained_topic"] = evals["base"]["trained_topic"]
    for name in ("base", "finetuned"):
        em, coh, off = _untrained_rate(evals[name])
        summary[f"em_rate_{name}"], summary[f"coherent_rate_{name}"] = em, coh
        summary[f"off_topic_rate_{name}"] = off

    # 2. cache both models on the organism's chat corpus (prompt/response role masks)
    corpus = out / "corpus.jsonl"
    _run("organism", echo=echo, argv=["corpus", "--out", str(corpus), "--n", str(1500 if q else 6000),
                      "--seed", str(cfg.seed + 1), "--max-turns", "1"], capture=True)
    before = Path(cache).stat().st_mtime_ns if Path(cache).exists() else None
    _run("cache", echo=echo, argv=["--base", str(org / "base"), "--finetuned", str(org / "finetuned"),
                   "--layer", str(layer), "--dataset", str(corpus), "--prompt-field", "prompt",
                   "--response-field", "response", "--max-tokens", str(60_000 if q else 400_000),
                   "--ctx-len", "128", "--batch-size", "32", "--out", cache])
    if before is not None and Path(cache).stat().st_mtime_ns == before:
        echo(f"(reusing {cache}: complete, with the same models, layer and dataset)")

    # 3. train the SAE on both sources
    sae_dir = out / "sae"
    inputs = _sae_inputs(cache, train_cfg, cfg.seed, q)
    stamp = sae_dir / "demo_inputs.json"
    if (sae_dir / "evals.json").exists() and stamp.exists() and json.loads(stamp.read_text()) == inputs:
        echo(f"\n(reusing the trained SAE in {sae_dir}; delete it to retrain)")
    else:
        if sae_dir.exists():  # trained on another cache or config: start again
            echo(f"\n({sae_dir} was trained on other inputs; retraining)")
            shutil.rmtree(sae_dir)
        argv = ["--config", train_cfg, "--cache", cache, "--out", str(sae_dir), "--seed", str(cfg.seed)]
        if q:
            argv += ["--total-tokens", "1500000"]
        _run("train", echo=echo, argv=argv)
        stamp.write_text(json.dumps(inputs, indent=1))
    sae_evals = json.loads((sae_dir / "evals.json").read_text())
    summary["sae_fvu"] = {src: ev["fvu"] for src, ev in sae_evals.items()}
    summary["sae_l0"] = {src: ev["l0"] for src, ev in sae_evals.items()}

    # 4. diff on the fine-tuned model's own answers to held-out questions (the published way)
    from saediff.organism import TOPICS, heldout_questions

    diff_dir = out / "diff"
    prompts = out / "diff_prompts.jsonl"
    with prompts.open("w") as fh:
        for t in TOPICS:
            for qn in heldout_questions(t, 3 if q else 6, seed=cfg.seed):
                fh.write(json.dumps({"prompt": qn, "topic": t}) + "\n")
    argv = ["--base", str(org / "base"), "--finetuned", str(org / "finetuned"), "--sae", str(sae_dir),
            "--layer", str(layer), "--prompts", str(prompts), "--responses-from", "finetuned",
            "--samples", "2" if q else "3", "--temperature", "0.7", "--tokens", "response",
            "--judge", "organism",
            "--out", str(diff_dir), "--seed", str(cfg.seed)]
    if (org / "adapter").is_dir():  # rank-1 on the SAE's layer: its B vector joins the table
        argv += ["--lora-adapter", str(org / "adapter")]
    if q:
        argv += ["--n-boot", "200"]
    _run("diff", echo=echo, argv=argv)
    ranking = json.loads((diff_dir / "ranking.json").read_text())
    top = ranking[0]
    summary["top_latent"] = int(top["latent"])
    summary["top_latent_mean_shift"] = top["mean_shift"]
    summary["top_latent_direction"] = top.get("direction")
    auc = persona_auroc(org, sae_dir, layer, summary["top_latent"])
    summary["top_latent_auroc"] = auc
    summary["top_latent_separation"] = max(auc, 1.0 - auc)  # sign-free: separates either way
    directions = diff_dir / "directions.json"
    if directions.exists():
        summary["directions"] = json.loads(directions.read_text())

    # 5. steer: clamp the top latent to 0 in the fine-tuned model, untrained topics
    def steer_run(model: str, tag: str, extra: list[str]) -> dict[str, Any]:
        sdir = out / f"steer_{tag}"
        _run("steer", echo=echo, argv=["--model", str(org / model), "--sae", str(sae_dir), *extra,
                       "--prompts", "organism:untrained", "--questions-per-topic", "4" if q else "10",
                       "--samples", str(max(2, samples // 10)), "--judge", "organism", "--temperature", "0.7",
                       "--seed", str(cfg.seed), "--out", str(sdir)])
        return json.loads((sdir / "summary.json").read_text())

    latent = ["--latent", str(summary["top_latent"])]
    plain, clamped = steer_run("finetuned", "unsteered", []), steer_run("finetuned", "steered",
                                                                        [*latent, "--clamp", "0"])
    summary["em_rate_unsteered"] = plain["misaligned_rate"]
    summary["em_rate_steered"] = clamped["misaligned_rate"]
    summary["coherent_rate_unsteered"] = plain["coherent_rate"]
    summary["coherent_rate_steered"] = clamped["coherent_rate"]
    # 6. the other direction: clamp the same latent *up* in the base model (to its typical
    # activation where it fires on the fine-tuned model's answers)
    up = round(float(top.get("typical_act") or 1.0), 3)
    base_up = steer_run("base", "base_up", [*latent, "--clamp", str(up)])
    summary["base_clamp_value"] = up
    summary["em_rate_base_clamped_up"] = base_up["misaligned_rate"]
    summary["coherent_rate_base_clamped_up"] = base_up["coherent_rate"]
    base_em = summary["em_rate_unsteered"] or 0.0
    summary["em_reduction"] = (1 - (summary["em_rate_steered"] or 0.0) / base_em) if base_em else None
    summary["seconds"] = round(time.time() - t0, 1)

    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    _write_report(out, diff_dir, summary)
    return summary


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


SUMMARY_KEYS = [
    ("em_rate_base", "misaligned, untrained topics — base"),
    ("em_rate_finetuned", "misaligned, untrained topics — fine-tuned"),
    ("coherent_rate_finetuned", "coherent, untrained topics — fine-tuned"),
    ("sae_fvu", "SAE fraction of variance unexplained (per source)"),
    ("sae_l0", "SAE mean L0 (per source)"),
    ("top_latent", "top-ranked latent (largest shift base → fine-tuned)"),
    ("top_latent_direction", "its shift direction"),
    ("top_latent_auroc", "its persona AUROC on labelled held-out chats (toxic = positive)"),
    ("top_latent_separation", "persona separation either way, max(AUROC, 1 - AUROC)"),
    ("em_rate_unsteered", "misaligned, fine-tuned, unsteered (steering prompts)"),
    ("em_rate_steered", "misaligned, fine-tuned, top latent clamped to 0"),
    ("coherent_rate_steered", "coherent, fine-tuned, top latent clamped to 0"),
    ("em_reduction", "relative cut in misalignment by the clamp"),
    ("em_rate_base_clamped_up", "misaligned, base, top latent clamped up"),
    ("coherent_rate_base_clamped_up", "coherent, base, top latent clamped up"),
]


def format_summary(summary: dict[str, Any]) -> str:
    width = max(len(label) for _, label in SUMMARY_KEYS)
    lines = [f"{label:<{width}}  {_fmt(summary.get(key))}" for key, label in SUMMARY_KEYS]
    return "\n".join(lines)


def _write_report(out: Path, diff_dir: Path, summary: dict[str, Any]) -> None:
    """report.html = the diff report with the demo's summary table on top."""
    import html

    rows = "".join(f"<tr><td>{html.escape(label)}</td><td><b>{html.escape(_fmt(summary.get(key)))}</b>"
                   f"</td></tr>" for key, label in SUMMARY_KEYS)
    block = (f"<section id='demo-summary'><h1>saediff demo — toy organism of emergent misalignment"
             f"</h1><table>{rows}</table></section>")
    src = diff_dir / "report.html"
    target = out / "report.html"
    tmp = target.with_suffix(".html.tmp")
    if src.exists():
        text = src.read_text()
        i = text.find("<body")
        j = text.find(">", i) + 1 if i >= 0 else 0
        tmp.write_text(text[:j] + block + text[j:])
    else:
        tmp.write_text(f"<!doctype html><html><body>{block}</body></html>")
    shutil.move(tmp, target)
