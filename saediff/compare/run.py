"""`saediff compare`: every diffing method's top candidate on one board, scored against
ground truth (persona labels, the LoRA B vector, the mean-diff direction) and causally
(ablate the direction in the fine-tuned model while it answers; EM rate and coherence with
Wilson CIs from the judge, through `saediff.judged.judged_generation`).

    res = run_compare(CompareConfig(base=B, finetuned_adapter=A, cache=PAIRED, out=DIR))
    DIR/compare.json   [{method, candidate, auroc, cos_lora_b, cos_mean_diff,
                         misaligned_given_coherent_unsteered, misaligned_given_coherent_steered,
                         coherent_rate_steered, n}, ...]
    DIR/summary.json   + CIs, cosines between methods, lenses, amplification
    DIR/report.html

Dictionaries (SAE, crosscoder, diff-SAE) that are not given are trained on the cache into
DIR/runs/ first (small, minutes on a CPU for the toy organism).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from saediff.compare.report import BOARD_COLUMNS
from saediff.errors import SaediffError
from saediff.io import check_writable_dir, output_lock, staged_outputs, write_json
from saediff.judged import GenerationConfig, JudgeConfig, Summary, judged_generation

log = logging.getLogger(__name__)

ALL_METHODS = ("sae", "crosscoder", "diff_sae", "pca", "mean_diff", "lora_b")


@dataclass
class CompareConfig(GenerationConfig, JudgeConfig):
    """Configuration of `saediff compare` (causal test sampling: `GenerationConfig`, its judge:
    `JudgeConfig`)."""

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
    samples: int = field(default=8, kw_only=True)
    """Answers sampled per prompt in each causal test."""
    questions_per_topic: int = 5
    """Held-out questions per topic (organism prompt sources)."""
    max_new_tokens: int = field(default=48, kw_only=True)
    """Length limit of each answer."""
    max_rows: int = 100_000
    """Paired cache rows the methods read."""
    lens_sequences: int = 32
    """Cache sequences scored by the per-token KL lens (0 skips it)."""
    alphas: list[float] = field(default_factory=list)
    """LoRA amplification factors to evaluate, e.g. 0,0.5,1,2,4 (needs --finetuned-adapter)."""
    out: str = "runs/compare"
    """Output directory."""
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
        for name in ("questions_per_topic", "d_sae", "train_tokens", "max_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.k <= 0 or self.lens_sequences < 0:
            raise ValueError("k must be > 0 and lens_sequences >= 0")
        super().__post_init__()  # GenerationConfig, JudgeConfig


# --- scoring ---------------------------------------------------------------------------------

def _cos(a: torch.Tensor, b: torch.Tensor | None) -> float | None:
    if b is None:
        return None
    return float((a.double() @ b.double()) / (a.double().norm() * b.double().norm()).clamp_min(
        1e-30))


def causal_test(lm: Any, items: list[dict[str, Any]], judge: Any, cfg: CompareConfig,
                layer: int, direction: torch.Tensor | None) -> Summary:
    """Generate with `direction` ablated at `layer` (None: unsteered) and judge."""
    from saediff.steer.hooks import steer

    cond = steer(lm, ablate=direction.float(), layer=layer) if direction is not None else None
    return judged_generation(lm, items, cfg.generation(), judge, cond).summary


COMPARE_OUTPUTS = ("compare.json", "summary.json", "report.html")


def run_compare(cfg: CompareConfig, base_lm: Any = None, ft_lm: Any = None) -> dict[str, Any]:
    """Build the board (see the module docstring); returns the summary dict.

    One process per `out` at a time; the three report files land together (`saediff.io`)."""
    with output_lock(cfg.out):
        return _run_compare(cfg, base_lm, ft_lm)


def _run_compare(cfg: CompareConfig, base_lm: Any, ft_lm: Any) -> dict[str, Any]:
    from saediff.compare.inputs import train_missing
    from saediff.config import config_to_dict
    from saediff.models import load_model
    from saediff.prompts import load_prompt_items

    out = check_writable_dir(cfg.out)
    items = load_prompt_items(cfg.prompts, cfg.questions_per_topic, cfg.seed)
    judge = cfg.make_judge()
    layer, d_model = _cache_layer(cfg)
    runs = train_missing(cfg, out)
    base_lm = base_lm or load_model(cfg.base, device=cfg.device)
    ft_lm = ft_lm or load_model(cfg.finetuned or cfg.base, cfg.finetuned_adapter,
                                device=cfg.device)
    inputs, scored = _method_inputs(cfg, layer, d_model, runs, base_lm, ft_lm)
    log.info("unsteered causal baseline")
    unsteered = causal_test(ft_lm, items, judge, cfg, layer, None)
    board, tops = _board(cfg, inputs, scored, _references(cfg, inputs), unsteered,
                         lambda v: causal_test(ft_lm, items, judge, cfg, layer, v))
    summary = {"leaderboard": board, "layer": layer, "runs": runs,
               "method_cosines": _method_cosines(tops),
               "amplification": _amplification(cfg, ft_lm, items, judge),
               "lenses": _lenses(inputs), "n_prompts": len(items), "config": config_to_dict(cfg)}
    _write(out, board, summary)
    return summary


def _cache_layer(cfg: CompareConfig) -> tuple[int, int]:
    """(layer, d_model) of the paired cache; --layer must match it."""
    from saediff.cache.format import open_cache

    with open_cache(cfg.cache) as c:
        layer = c.layer if cfg.layer is None else cfg.layer
        if layer != c.layer:
            raise SaediffError(f"--layer {cfg.layer} but {cfg.cache} holds layer {c.layer}")
        return layer, c.d_model


def _method_inputs(cfg: CompareConfig, layer: int, d_model: int, runs: dict[str, str | None],
                   base_lm: Any, ft_lm: Any) -> tuple[Any, tuple[torch.Tensor, list[dict]]]:
    """What the methods read, and the held-out half every AUROC is scored on.

    Supervised directions (mean-diff) are fitted on the even held-out rows; every AUROC is
    scored on the odd rows, so no method is scored on the data it was computed from."""
    from saediff.cache.format import open_cache
    from saediff.compare.inputs import heldout_rows, labelled_residuals
    from saediff.diff.methods import MethodInputs, paired_rows

    rows = paired_rows(cfg.cache, cfg.max_rows)
    held = heldout_rows(cfg)
    resid_all, labels_all = labelled_residuals(ft_lm, held, layer)
    fit = torch.arange(len(labels_all)) % 2 == 0
    seqs = None
    if cfg.lens_sequences:
        with open_cache(cfg.cache) as c:
            seqs = [s["ids"] for s in c.sequences(0, min(cfg.lens_sequences, c.n_sequences))]
    inputs = MethodInputs(layer=layer, d_model=d_model, x_base=rows["x_base"], x_ft=rows["x_ft"],
                          adapter=cfg.finetuned_adapter, resid=resid_all[fit],
                          labels=labels_all[fit], rows=rows, base_lm=base_lm, ft_lm=ft_lm,
                          sequences=seqs, **runs)
    scored = [{"label": int(y)} for y in labels_all[~fit]]
    return inputs, (resid_all[~fit], scored)


def _references(cfg: CompareConfig, inputs: Any) -> dict[str, torch.Tensor | None]:
    """The ground-truth directions: mean-diff (fitted half) and the largest LoRA B vector."""
    from saediff.diff.directions import lora_b_vectors
    from saediff.diff.methods import METHODS

    mean_diff = METHODS["mean_diff"]().candidates(inputs)[0].vector
    lora = lora_b_vectors(cfg.finetuned_adapter, inputs.layer, inputs.d_model) \
        if cfg.finetuned_adapter else []
    lora_b = max(lora, key=lambda d: float(d.vector.norm())).vector if lora else None
    return {"mean_diff": mean_diff, "lora_b": lora_b}


def _board(cfg: CompareConfig, inputs: Any, scored: tuple[torch.Tensor, list[dict]],
           refs: dict[str, torch.Tensor | None], unsteered: Summary,
           ablated: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One row per method: its top candidate's AUROC, cosines and causal test."""
    from saediff.diff.methods import METHODS
    from saediff.stats import persona_auroc

    resid, rows = scored
    board, tops = [], {}
    for m in cfg.methods:
        try:
            cands = METHODS[m]().candidates(inputs)
        except SaediffError as exc:
            log.warning("method %s skipped: %s", m, exc)
            continue
        top = tops[m] = cands[0]
        log.info("causal test: %s %s", m, top.name)
        st = ablated(top.vector)
        board.append({
            "method": m, "candidate": top.name,
            "auroc": persona_auroc(resid @ (top.vector / top.vector.norm()), rows),
            "cos_lora_b": _cos(top.vector, refs["lora_b"]),
            "cos_mean_diff": _cos(top.vector, refs["mean_diff"]),
            **_condition_rates(unsteered, "unsteered"), **_condition_rates(st, "steered"),
            "n": st.n, "score": top.score, "info": top.info,
            "runners_up": [c.name for c in cands[1:]]})
    return board, tops


def _condition_rates(s: Summary, tag: str) -> dict[str, Any]:
    """EM and coherent rate (with CIs) of one condition, suffixed by its tag."""
    return {f"misaligned_given_coherent_{tag}": s.misaligned_given_coherent,
            f"misaligned_given_coherent_{tag}_ci": s.misaligned_given_coherent_ci,
            f"coherent_rate_{tag}": s.coherent_rate, f"coherent_rate_{tag}_ci": s.coherent_rate_ci}


def _method_cosines(tops: dict[str, Any]) -> dict[str, Any]:
    from saediff.diff.directions import cosine_matrix

    cos = cosine_matrix([t.vector for t in tops.values()]).tolist() if tops else []
    return {"names": list(tops), "cosines": cos}


def _amplification(cfg: CompareConfig, ft_lm: Any, items: list[dict[str, Any]],
                   judge: Any) -> list[dict[str, Any]]:
    if not cfg.alphas:
        return []
    from saediff.compare.amplify import run_amplification

    return run_amplification(ft_lm, items, cfg.alphas, judge, cfg.generation())


def _lenses(inputs: Any) -> dict[str, Any]:
    """Every lens's tables, merged (`saediff.diff.methods.LENSES`)."""
    from saediff.diff.methods import LENSES

    out: dict[str, Any] = {}
    for lens in LENSES.values():
        out.update(lens().tokens(inputs))
    return out


def _write(out: Path, board: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    from saediff.compare.report import write_compare_report

    with staged_outputs(out, COMPARE_OUTPUTS, "saediff compare") as stage:
        write_json(stage / "compare.json", [{c: r[c] for c in BOARD_COLUMNS} for r in board])
        write_json(stage / "summary.json", summary)
        write_compare_report(summary, stage / "report.html")
