"""`saediff compare`: every diffing method's top candidate on one leaderboard, scored against
ground truth (persona labels, the LoRA B vector, the mean-diff direction) and causally
(ablate the direction in the fine-tuned model while it answers; EM rate and coherence with
Wilson CIs from the judge).

    res = run_compare(CompareConfig(base=B, finetuned_adapter=A, cache=PAIRED, out=DIR))
    DIR/leaderboard.json   [{method, candidate, auroc, cos_lora_b, cos_mean_diff,
                             em_rate_unsteered, em_rate_steered, coherent_rate_steered, n}, ...]
    DIR/summary.json       + CIs, cosines between methods, lenses, amplification
    DIR/report.html

Dictionaries (SAE, crosscoder, diff-SAE) that are not given are trained on the cache into
DIR/runs/ first (small, minutes on a CPU for the toy organism).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from saediff.errors import SaediffError
from saediff.io import check_writable_dir, output_lock, staged_outputs, write_json

log = logging.getLogger(__name__)

ALL_METHODS = ("sae", "crosscoder", "diff_sae", "pca", "mean_diff", "lora_b")


@dataclass
class CompareConfig:
    """Configuration of `saediff compare`."""

    base: str
    """Base model (local HF directory or hub name)."""
    cache: str
    """Paired activation cache of base and fine-tuned (`saediff cache --finetuned ...`)."""
    finetuned: str | None = None
    """Fine-tuned model (merged); or give --finetuned-adapter."""
    finetuned_adapter: str | None = None
    """PEFT adapter of the fine-tune (applied on --finetuned, else on --base)."""
    prompts: str = "organism:untrained"
    """Prompts for the causal test (file or organism[:topics])."""
    methods: list[str] = field(default_factory=lambda: list(ALL_METHODS))
    """Methods on the leaderboard: sae, crosscoder, diff_sae, pca, mean_diff, lora_b."""
    sae: str | None = None
    """SAE run directory (else one is trained on the cache into OUT/runs/sae)."""
    crosscoder: str | None = None
    """Crosscoder run directory (else trained into OUT/runs/crosscoder)."""
    diff_sae: str | None = None
    """Diff-SAE run directory (else trained into OUT/runs/diff_sae)."""
    d_sae: int = 384
    """Latents of dictionaries trained here."""
    k: float = 8
    """Active latents per token of dictionaries trained here."""
    train_tokens: int = 400_000
    """Training tokens of each dictionary trained here."""
    layer: int | None = None
    """Layer (default: the cache's)."""
    heldout: str | None = None
    """Labelled JSONL (prompt, response, persona aligned/toxic or label 0/1) for the AUROC and
    the mean-diff direction; default the organism's held-out set."""
    samples: int = 8
    """Answers per prompt in each causal test."""
    questions_per_topic: int = 5
    """Held-out questions per topic (organism prompt sources)."""
    max_new_tokens: int = 48
    """Answer length limit."""
    temperature: float = 1.0
    """Sampling temperature."""
    judge: Literal["organism", "openai"] = "organism"
    """Judge of the causal test."""
    judge_base_url: str | None = None
    """OpenAI-compatible base URL (judge openai)."""
    judge_model: str | None = None
    """Judge model name (judge openai)."""
    max_rows: int = 100_000
    """Paired cache rows the methods read."""
    lens_sequences: int = 32
    """Cache sequences scored by the per-token KL lens (0 skips it)."""
    alphas: list[float] = field(default_factory=list)
    """LoRA amplification factors to evaluate, e.g. 0,0.5,1,2,4 (needs --finetuned-adapter)."""
    out: str = "runs/compare"
    """Output directory."""
    seed: int = 0
    """Seed for training and sampling."""
    device: str = "cpu"
    """Torch device."""

    def __post_init__(self) -> None:
        if isinstance(self.methods, str):
            self.methods = [self.methods]
        # `--methods sae,pca` and `--methods sae pca` both work
        self.methods = [m.strip() for part in self.methods for m in str(part).split(",")
                        if m.strip()]
        bad = [m for m in self.methods if m not in ALL_METHODS]
        if bad or not self.methods:
            raise ValueError(f"methods: unknown {bad or 'none given'}; choose from {ALL_METHODS}")
        if not self.finetuned and not self.finetuned_adapter:
            raise ValueError("give finetuned or finetuned_adapter")
        if self.alphas and not self.finetuned_adapter:
            raise ValueError("alphas (LoRA amplification) need finetuned_adapter")
        for name in ("samples", "questions_per_topic", "max_new_tokens", "d_sae", "train_tokens",
                     "max_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.k <= 0 or self.temperature < 0 or self.lens_sequences < 0:
            raise ValueError("k must be > 0, temperature and lens_sequences >= 0")


# --- inputs ----------------------------------------------------------------------------------

def _train_missing(cfg: CompareConfig, out: Path) -> dict[str, str | None]:
    """Run dirs of the dictionaries the methods need, training the missing ones."""
    from saediff.train.loop import TrainConfig, train

    need = {"sae": ("sae", {}), "crosscoder": ("crosscoder", {"architecture": "crosscoder"}),
            "diff_sae": ("diff_sae", {"input": "difference"})}
    runs: dict[str, str | None] = {}
    for method, (attr, over) in need.items():
        given = getattr(cfg, attr)
        if method not in cfg.methods or given:
            runs[attr] = given
            continue
        rdir = out / "runs" / attr
        if (rdir / "cfg.json").is_file():
            import json

            old = json.loads((rdir / "train_config.json").read_text()).get("cache")
            if old != [cfg.cache]:
                raise SaediffError(f"{rdir} was trained on {old}, not {cfg.cache}; pass a "
                                   f"fresh --out or delete {rdir}")
            log.info("reusing %s (trained on the same cache)", rdir)
        else:
            kw: dict[str, Any] = dict(cache=[cfg.cache], out=str(rdir), d_sae=cfg.d_sae, k=cfg.k,
                                      total_tokens=cfg.train_tokens, batch_size=1024, lr=2e-3,
                                      eval_sequences=0, checkpoint_every=0, seed=cfg.seed,
                                      device=cfg.device, buffer_rows=1 << 16,
                                      dead_feature_window=100)
            kw.update(over)
            if over.get("architecture") != "crosscoder":
                kw["architecture"] = "topk"
            log.info("training %s into %s", attr, rdir)
            train(TrainConfig(**kw), evals=False)
        runs[attr] = str(rdir)
    return runs


@torch.no_grad()
def labelled_residuals(lm: Any, rows: list[dict[str, Any]], layer: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example mean residual over the response tokens [n, d] and labels [n] (1 = toxic)."""
    from saediff.models import ROLE_RESPONSE, encode_chat, run_to_layer

    feats, labels = [], []
    for i, r in enumerate(rows):
        lab = r.get("label")
        if lab is None and "persona" in r:
            lab = int(r["persona"] != "aligned")
        if lab is None or not r.get("response"):
            raise SaediffError(f"held-out row {i}: needs prompt, response and persona or label")
        ids, roles = encode_chat(lm.tokenizer, r["prompt"], r["response"])
        x = torch.tensor([ids])
        h = run_to_layer(lm, x, torch.ones_like(x), layer)[0].float().cpu()
        mask = torch.tensor(roles) == ROLE_RESPONSE
        if not mask.any():
            continue
        feats.append(h[mask].mean(0))
        labels.append(int(lab))
    if len(set(labels)) < 2:
        raise SaediffError("held-out data needs both aligned and misaligned examples")
    return torch.stack(feats), torch.tensor(labels)


def _heldout_rows(cfg: CompareConfig) -> list[dict[str, Any]]:
    if cfg.heldout is None:
        from saediff.organism import load_heldout_labelled

        return load_heldout_labelled()
    from saediff.prompts import load_prompt_items

    return load_prompt_items(cfg.heldout)


# --- scoring ---------------------------------------------------------------------------------

def _cos(a: torch.Tensor, b: torch.Tensor | None) -> float | None:
    if b is None:
        return None
    return float((a.double() @ b.double()) / (a.double().norm() * b.double().norm()).clamp_min(
        1e-30))


def causal_test(lm: Any, items: list[dict[str, Any]], judge: Any, cfg: CompareConfig,
                layer: int, direction: torch.Tensor | None) -> dict[str, Any]:
    """Generate with `direction` ablated at `layer` (None: unsteered) and judge."""
    from saediff.prompts import generate_answers
    from saediff.steer.evaluate import judge_records, summarise
    from saediff.steer.hooks import steer

    ctx = steer(lm, ablate=direction.float(), layer=layer) if direction is not None else None
    recs = generate_answers(lm, items, cfg.samples, cfg.max_new_tokens, cfg.temperature,
                            cfg.seed, context=ctx)
    return summarise(judge_records(recs, judge), recs)


COMPARE_OUTPUTS = ("leaderboard.json", "summary.json", "report.html")


def run_compare(cfg: CompareConfig, base_lm: Any = None, ft_lm: Any = None) -> dict[str, Any]:
    """Build the leaderboard (see the module docstring); returns the summary dict.

    One process per `out` at a time; the three report files land together (`saediff.io`)."""
    with output_lock(cfg.out):
        return _run_compare(cfg, base_lm, ft_lm)


def _run_compare(cfg: CompareConfig, base_lm: Any, ft_lm: Any) -> dict[str, Any]:
    from saediff.cache.format import open_cache
    from saediff.config import config_to_dict
    from saediff.diff.directions import cosine_matrix, lora_b_vectors
    from saediff.diff.methods import METHODS, MethodInputs, paired_rows
    from saediff.judges import make_judge
    from saediff.models import load_model
    from saediff.prompts import load_prompt_items
    from saediff.stats import auroc
    from saediff.steer.leaderboard_report import lens_tables, write_compare_report

    out = check_writable_dir(cfg.out)
    items = load_prompt_items(cfg.prompts, cfg.questions_per_topic, cfg.seed)
    judge = make_judge(cfg.judge, cfg.judge_base_url, cfg.judge_model)
    with open_cache(cfg.cache) as c:
        layer = c.layer if cfg.layer is None else cfg.layer
        if layer != c.layer:
            raise SaediffError(f"--layer {cfg.layer} but {cfg.cache} holds layer {c.layer}")
        d_model = c.d_model
    runs = _train_missing(cfg, out)
    base_lm = base_lm or load_model(cfg.base, device=cfg.device)
    ft_lm = ft_lm or load_model(cfg.finetuned or cfg.base, cfg.finetuned_adapter,
                                device=cfg.device)
    rows = paired_rows(cfg.cache, cfg.max_rows)
    resid_all, labels_all = labelled_residuals(ft_lm, _heldout_rows(cfg), layer)
    # supervised directions (mean-diff) are fitted on even rows; every AUROC is scored on the odd
    # rows, so no method is scored on the data it was computed from
    fit = torch.arange(len(labels_all)) % 2 == 0
    resid, labels = resid_all[~fit], labels_all[~fit]
    inputs = MethodInputs(layer=layer, d_model=d_model, x_base=rows["x_base"], x_ft=rows["x_ft"],
                          adapter=cfg.finetuned_adapter, resid=resid_all[fit],
                          labels=labels_all[fit], **runs)
    mean_diff = METHODS["mean_diff"]().candidates(inputs)[0].vector
    lora = lora_b_vectors(cfg.finetuned_adapter, layer, d_model) if cfg.finetuned_adapter \
        else []
    lora_b = max(lora, key=lambda d: float(d.vector.norm())).vector if lora else None
    log.info("unsteered causal baseline")
    base_run = causal_test(ft_lm, items, judge, cfg, layer, None)
    board, summary_rows, tops = [], [], {}
    for m in cfg.methods:
        try:
            cands = METHODS[m]().candidates(inputs)
        except SaediffError as exc:
            log.warning("method %s skipped: %s", m, exc)
            continue
        top = cands[0]
        tops[m] = top
        proj = resid @ (top.vector / top.vector.norm())
        log.info("causal test: %s %s", m, top.name)
        st = causal_test(ft_lm, items, judge, cfg, layer, top.vector)
        row = {"method": m, "candidate": top.name, "auroc": auroc(proj, labels),
               "cos_lora_b": _cos(top.vector, lora_b), "cos_mean_diff": _cos(top.vector, mean_diff),
               "em_rate_unsteered": base_run["misaligned_given_coherent"],
               "em_rate_steered": st["misaligned_given_coherent"],
               "coherent_rate_steered": st["coherent_rate"], "n": st["n"]}
        board.append(row)
        summary_rows.append({**row, "em_ci_unsteered": base_run["misaligned_given_coherent_ci"],
                             "em_ci_steered": st["misaligned_given_coherent_ci"],
                             "coherent_ci_steered": st["coherent_ci"],
                             "coherent_rate_unsteered": base_run["coherent_rate"],
                             "score": top.score, "info": top.info,
                             "runners_up": [c.name for c in cands[1:]]})
    names = list(tops)
    cos = cosine_matrix([t.vector for t in tops.values()]).tolist() if tops else []
    amp = []
    if cfg.alphas:
        from saediff.steer.amplify import run_amplification

        amp = run_amplification(ft_lm, items, cfg.alphas, judge, cfg.samples, cfg.max_new_tokens,
                                cfg.temperature, cfg.seed)
    lenses = lens_tables(cfg.cache, rows, base_lm, ft_lm, cfg.lens_sequences)
    summary = {"leaderboard": summary_rows, "layer": layer, "runs": runs,
               "method_cosines": {"names": names, "cosines": cos},
               "amplification": amp, "lenses": lenses, "n_prompts": len(items),
               "config": config_to_dict(cfg)}
    with staged_outputs(out, COMPARE_OUTPUTS, "saediff compare") as stage:
        write_json(stage / "leaderboard.json", board)
        write_json(stage / "summary.json", summary)
        write_compare_report(summary, stage / "report.html")
    return summary
