"""The differ: rank SAE latents by how much a fine-tune (or a prompt condition) shifts them.

    res = run_diff(DiffConfig(base=..., finetuned=[...], sae=RUN, layer=L, prompts=SRC))
    res.table[0]        # {'latent', 'rank', 'mean_shift', 'ci_low', 'ci_high', ...}
    res.to_dir("reports/x")

Lower-level pieces: `latent_activations` (SAE latents of every token, per sequence) and
`rank_latents` (paired per-token activations -> ranked statistics table).
"""
from __future__ import annotations

import contextlib
import csv
import gc
import io
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import saediff.diff.directions as dirs
import saediff.diff.passes as passes
from saediff.bridge import as_loaded_model
from saediff.diff.data import (
    DiffConfig,
    Labeler,
    ModelContext,
    Side,
    build_examples,
    check_positions,
    encode_sides,
    load_prompts,
    sample_responses,
    selected_roles,
)
from saediff.diff.passes import encode_batch
from saediff.diff.stream import LatentStats, rows_per_chunk
from saediff.errors import SaediffError
from saediff.io import check_writable_dir, output_lock, staged_outputs, write_json, write_text
from saediff.models import LoadedModel, check_same_tokenizer, load_model
from saediff.sae import check_sae, load_sae, require_activation_sae
from saediff.stats import bootstrap_mean_ci, group_sums

log = logging.getLogger(__name__)
TABLE_FIELDS = ("rank", "latent", "mean_shift", "ci_low", "ci_high", "direction", "mean_base",
                "mean_finetuned", "freq_base", "freq_finetuned", "freq_shift", "typical_act",
                "norm_shift", "significant")


@torch.no_grad()
def latent_activations(lm: LoadedModel, sae: Any, layer: int,
                       token_batches: Iterable[list[list[int]]],
                       context: contextlib.AbstractContextManager[Any] | None = None,
                       return_resid: bool = False, latents: list[int] | None = None) -> Any:
    """SAE latents of the residual stream after block `layer`, one [T_i, d_sae] tensor per sequence.

    `token_batches` yields lists of token-id lists (right-padded here; padding never reaches
    the result). With `return_resid`, also returns the [T_i, d_model] residuals.
    `context` (e.g. a steering hook) is entered around the forward passes. Holds every token:
    for large sets use `run_diff`, which streams (`saediff.diff.stream`).
    """
    lm = as_loaded_model(lm)  # also a TransformerBridge
    acts, resids = [], []
    with context or contextlib.nullcontext():
        for batch in token_batches:
            for a, r in encode_batch(lm, sae, layer, batch, latents):
                acts.append(a)
                if return_resid:
                    resids.append(r)
    return (acts, resids) if return_resid else acts


def rank_latents(acts_base: torch.Tensor, acts_ft: torch.Tensor, seq_index: torch.Tensor,
                 rank_by: str = "mean_shift", direction: str = "both", n_boot: int = 1000,
                 ci_level: float = 0.95, fire_threshold: float = 0.0, seed: int = 0,
                 chunk: int = 4096) -> list[dict[str, Any]]:
    """Rank latents by their shift between paired token activations [N, d_sae] of two sides.

    `seq_index` [N] gives each token's group (prompt); the CI resamples groups. Returns one
    row per latent, sorted by rank (1 = largest shift in the requested direction). The same
    streaming statistics as `run_diff` (`LatentStats`), fed in token chunks.
    """
    if acts_base.shape != acts_ft.shape:
        raise SaediffError(f"paired activations differ in shape: {tuple(acts_base.shape)} vs "
                           f"{tuple(acts_ft.shape)}")
    if acts_base.shape[0] == 0:
        raise SaediffError("no tokens to rank latents on")
    groups = torch.unique(seq_index.long(), return_inverse=True)[1]
    st = LatentStats(acts_base.shape[1], int(groups.max()) + 1, fire_threshold)
    step = rows_per_chunk(acts_base.shape[1], 1 << 30)
    for s in range(0, acts_base.shape[0], step):
        st.update(acts_base[s: s + step], acts_ft[s: s + step], groups[s: s + step])
    return st.table(rank_by, direction, n_boot, ci_level, seed, chunk)


@dataclass
class DiffResult:
    """Everything `saediff diff` found; `.table` is the ranking (list of dicts, rank order)."""

    table: list[dict[str, Any]]
    config: dict[str, Any] = field(default_factory=dict)
    evidence: list[dict[str, Any]] = field(default_factory=list)
    directions: dict[str, Any] = field(default_factory=dict)
    trajectory: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def top(self, k: int = 10) -> list[dict[str, Any]]:
        return self.table[:k]

    def format_table(self, k: int = 10) -> str:
        head = f"{'rank':>4} {'latent':>7} {'shift':>9} {'95% CI':>21} {'dir':>4} {'freqΔ':>7} {'normΔ':>7}"
        lines = [head]
        for r in self.table[:k]:
            lines.append(f"{r['rank']:>4} {r['latent']:>7} {r['mean_shift']:>9.4f} "
                         f"[{r['ci_low']:>9.4f},{r['ci_high']:>9.4f}] {r['direction']:>4} "
                         f"{r['freq_shift']:>7.3f} {r['norm_shift']:>7.3f}")
        return "\n".join(lines)

    def to_dir(self, out: str | Path, html: bool = True) -> Path:
        """Write the report files into `out` as one set (`saediff.io.staged_outputs`): a rerun
        never leaves the old run's files beside the new, and a killed one never mixes them."""
        with output_lock(out), staged_outputs(out, DIFF_OUTPUTS, "saediff diff") as stage:
            write_json(stage / "ranking.json", self.table)
            buf = io.StringIO(newline="")
            w = csv.DictWriter(buf, fieldnames=list(TABLE_FIELDS), lineterminator="\r\n")
            w.writeheader()
            w.writerows({k: r[k] for k in TABLE_FIELDS} for r in self.table)
            write_text(stage / "ranking.csv", buf.getvalue())
            if len(self.directions.get("names", [])) > 1:
                write_json(stage / "directions.json", self.directions)
            write_json(stage / "evidence.json", self.evidence)
            if self.trajectory:
                write_json(stage / "trajectory.json", self.trajectory)
            write_json(stage / "meta.json", {"config": self.config, **self.meta,
                                             "trajectory": self.trajectory})
            if html:
                from saediff.diff.report import write_report

                write_report(self, stage / "report.html")
        return Path(out)


DIFF_OUTPUTS = ("ranking.json", "ranking.csv", "directions.json", "evidence.json",
                "trajectory.json", "meta.json", "report.html", "reroute.json")


def _selected(acts: list[torch.Tensor], side: Side) -> torch.Tensor:
    return torch.cat([a[m] for a, m in zip(acts, side.select)])


def _check_fit(cfg: DiffConfig, sae: Any, base: LoadedModel) -> None:
    """The SAE fits the model and layer; --contexts-cache fits the SAE and the tokenizer."""
    check_sae(sae, base, cfg.layer)
    if cfg.contexts_cache:
        from saediff.diff.evidence import check_contexts_cache
        from saediff.models import tokenizer_fingerprint

        check_contexts_cache(cfg.contexts_cache, sae, cfg.layer,
                             tokenizer_fingerprint(base.tokenizer))


def _prompt_induced(cfg: DiffConfig, finetuned_context: ModelContext | None) -> bool:
    """No fine-tuned model: the two sides differ by their prompt condition (or the context)."""
    induced = not cfg.finetuned and not cfg.finetuned_adapter
    if induced and (cfg.base_system, cfg.base_prefix) == (cfg.finetuned_system, cfg.finetuned_prefix) \
            and finetuned_context is None:
        raise SaediffError("nothing to diff: no --finetuned model/adapter and both sides use the "
                           "same prompt condition (give --finetuned-system or --finetuned-prefix)")
    return induced


def _load_sae(cfg: DiffConfig) -> Any:
    sae = load_sae(cfg.sae, cfg.device)
    require_activation_sae(sae, cfg.sae, "saediff diff")
    return sae.eval()


@dataclass
class _Models:
    """The base model and the fine-tuned checkpoints (loaded one at a time, on demand)."""

    cfg: DiffConfig
    base: LoadedModel
    prompt_induced: bool

    def __post_init__(self) -> None:
        self.ckpts = self.cfg.checkpoints()

    def load(self, i: int) -> LoadedModel:
        if self.prompt_induced:
            return self.base
        lm = load_model(self.ckpts[i][0], self.ckpts[i][1], device=self.cfg.device)
        check_same_tokenizer(self.base, lm)
        return lm


def _sample(cfg: DiffConfig, rows: list[dict[str, Any]], base: LoadedModel, final: LoadedModel,
            fn: ModelContext | None) -> list[Any] | None:
    """Responses sampled from one side (`--responses-from base|finetuned`), else None."""
    if cfg.responses_from not in ("base", "finetuned"):
        return None
    on_base = cfg.responses_from == "base"
    ctx = None if on_base else passes.context(fn, final)
    return sample_responses(base if on_base else final, [r["prompt"] for r in rows], cfg,
                            cfg.base_system if on_base else cfg.finetuned_system, ctx)


def _directions(cfg: DiffConfig, models: _Models, first: passes.FirstPass, top: list[int],
                w_dec: torch.Tensor, n_tok: int) -> dict[str, Any]:
    """Candidate directions (diff-in-means of labels and of models, LoRA B, top decoder rows)
    compared with each other and with the top latents' decoder span."""
    cands: list[dirs.Direction] = []
    n0, n1 = first.label_n[0], first.label_n[1]
    if n0[0] and n1[0]:
        if not n0[1] or not n1[1]:
            raise SaediffError("difference in means needs tokens on both sides")
        lab = (first.label_sums[1] / n1[1] - first.label_sums[0] / n0[1]).float()
        cands.append(dirs.Direction("diff-in-means (misaligned-aligned answers)", "diff_means", lab))
    cands.append(dirs.Direction("diff-in-means (finetuned-base)", "diff_means",
                                ((first.rsum_f - first.rsum_b) / n_tok).float()))
    adapters = list(dict.fromkeys([a for a in [models.ckpts[-1][1], *cfg.lora_adapter] if a]))
    for ad in adapters:
        for d in dirs.lora_b_vectors(ad, cfg.layer, models.base.d_model):
            if len(adapters) > 1:
                d.name += f" ({Path(ad).name})"
            cands.append(d)
    for j in top[: min(cfg.top_k, 10)]:
        cands.append(dirs.Direction(f"latent {j}", "decoder", w_dec[j]))
    return dirs.compare(cands, w_dec[top])


def _answer_auroc(cfg: DiffConfig, evidence: list[dict[str, Any]], sides: passes.Sides,
                  acts_f: list[torch.Tensor], sampled: bool) -> None:
    """Per top latent, the AUROC of its mean activation for this diff's labelled answers."""
    from saediff.stats import auroc

    labels = [e.label for e in sides.examples]
    if all(x is None for x in labels):
        return
    for c, ev in enumerate(evidence):
        sign = 1 if ev["direction"] == "up" else -1
        pairs = [(sign * float(a[m][:, c].mean()), lab) for a, m, lab in
                 zip(acts_f, sides.finetuned.select, labels) if lab is not None and m.any()]
        if len({p[1] for p in pairs}) != 2:
            continue
        ev["auroc_labels"] = auroc([p[0] for p in pairs], [p[1] for p in pairs])
        ev["auroc_labels_n"] = len(pairs)
        ev["auroc_labels_positive"] = sum(int(p[1]) for p in pairs)
        ev["auroc_labels_data"] = (
            "this diff's sampled answers, judge labels" if sampled else
            f"this diff's answers from the prompts file, its '{cfg.label_field}' labels")


def _trajectory(cfg: DiffConfig, models: _Models, sae: Any, sides: passes.Sides,
                second: passes.SecondPass, fn: ModelContext | None) -> dict[str, Any]:
    """Every checkpoint's shift of the top latents, with CIs (the final one is already
    measured; the others are reloaded one at a time)."""
    if len(models.ckpts) <= 1:
        return {}
    seq_index = torch.cat([torch.full((int(m.sum()),), e.group)
                           for e, m in zip(sides.examples, sides.base.select)])
    base_top = _selected(second.acts_b, sides.base)
    traj: dict[str, Any] = {"checkpoints": [], "latents": second.top, "mean_shift": [],
                            "ci_low": [], "ci_high": []}
    for i, (m, a) in enumerate(models.ckpts):
        if i == len(models.ckpts) - 1:
            ft_top = _selected(second.acts_f, sides.finetuned)
        else:
            lm = models.load(i)
            acts_i = latent_activations(lm, sae, cfg.layer, sides.finetuned.batches(cfg.batch_size),
                                        passes.context(fn, lm), latents=second.top)
            ft_top = _selected(acts_i, sides.finetuned)
            del lm, acts_i
            gc.collect()
        sums, counts = group_sums(ft_top - base_top, seq_index)
        lo, hi = bootstrap_mean_ci(sums, counts, cfg.n_boot, cfg.ci_level, cfg.seed)
        traj["mean_shift"].append((ft_top - base_top).mean(0).tolist())
        traj["ci_low"].append(lo.tolist())
        traj["ci_high"].append(hi.tolist())
        traj["checkpoints"].append(Path(a).name if a else Path(m).name)
    return traj


def _meta(models: _Models, final: LoadedModel, rows: list[Any], sides: passes.Sides,
          n_tok: int, d_sae: int, roles: Any) -> dict[str, Any]:
    return {"n_prompts": len(rows), "n_examples": len(sides.examples), "n_tokens": n_tok,
            "d_sae": d_sae, "roles": list(roles), "prompt_induced": models.prompt_induced,
            "models": {"base": models.base.provenance(), "finetuned": final.provenance()},
            "checkpoints": [[m, a] for m, a in models.ckpts],
            "examples": [{"prompt": e.prompt, "response": e.response, "label": e.label}
                         for e in sides.examples[:200]]}


def run_diff(cfg: DiffConfig, finetuned_context: ModelContext | None = None,
             labeler: Labeler | None = None) -> DiffResult:
    """Load models and SAE, measure both sides, rank latents, gather evidence and directions.

    `finetuned_context(lm)` is entered around every fine-tuned-side forward pass (e.g. a latent
    clamp for a rerouting check). `labeler(row, response)` labels sampled responses (1 =
    misaligned, 0 = aligned) for the labelled difference-in-means direction and AUROC.
    """
    from saediff.config import config_to_dict
    from saediff.diff.evidence import collect_evidence

    if cfg.out:
        check_writable_dir(cfg.out)  # before any model runs
    induced = _prompt_induced(cfg, finetuned_context)
    rows = load_prompts(cfg.prompts, cfg)
    sae = _load_sae(cfg)
    models = _Models(cfg, load_model(cfg.base, cfg.base_adapter, device=cfg.device), induced)
    _check_fit(cfg, sae, models.base)
    final = models.load(len(models.ckpts) - 1)
    sampled = _sample(cfg, rows, models.base, final, finetuned_context)
    examples = build_examples(rows, cfg, sampled, labeler)
    roles = selected_roles(cfg, examples)
    sides = passes.Sides(examples, *encode_sides(models.base.tokenizer, examples, cfg, roles))
    check_positions((sides.base, sides.finetuned), models.base)
    n_tok = sum(int(m.sum()) for m in sides.base.select)

    first = passes.first_pass(models.base, final, sae, cfg, sides, finetuned_context)
    second = passes.second_pass(models.base, final, sae, cfg, sides, finetuned_context, first)
    table = first.stats.table(cfg.rank_by, cfg.direction, cfg.n_boot, cfg.ci_level, cfg.seed,
                              group_sums=(second.ci_latents, second.group_sums)
                              if second.ci_latents else None)
    log.info("ranked %d latents on %d tokens from %d examples", len(table), n_tok, len(examples))

    w_dec = sae.W_dec.detach().float().cpu()
    directions = _directions(cfg, models, first, second.top, w_dec, n_tok)
    evidence = collect_evidence(cfg, sae, final, table[: cfg.top_k], examples, sides.base,
                                sides.finetuned, second.acts_b, second.acts_f, w_dec,
                                columns=second.top)
    _answer_auroc(cfg, evidence, sides, second.acts_f, sampled is not None)
    trajectory = _trajectory(cfg, models, sae, sides, second, finetuned_context)
    return DiffResult(table=table, config=config_to_dict(cfg), evidence=evidence,
                      directions=directions, trajectory=trajectory,
                      meta=_meta(models, final, rows, sides, n_tok, int(w_dec.shape[0]), roles))
