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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import saediff.diff.directions as dirs
from saediff.diff.stream import LatentStats, rows_per_chunk
from saediff.diff.data import (DiffConfig, Labeler, ModelContext, Side, build_examples,
                              check_positions, encode_sides, load_prompts, sample_responses,
                              selected_roles)
from saediff.errors import SaediffError
from saediff.io import check_writable_dir, output_lock, staged_outputs, write_json, write_text
from saediff.bridge import as_loaded_model
from saediff.models import LoadedModel, check_same_tokenizer, load_model, pad_batch, run_to_layer
from saediff.stats import bootstrap_mean_ci, group_sums
from saediff.sae import check_sae, load_sae, require_activation_sae

log = logging.getLogger(__name__)
TABLE_FIELDS = ("rank", "latent", "mean_shift", "ci_low", "ci_high", "direction", "mean_base",
                "mean_finetuned", "freq_base", "freq_finetuned", "freq_shift", "typical_act",
                "norm_shift", "significant")


@torch.no_grad()
def encode_batch(lm: LoadedModel, sae: Any, layer: int, batch: list[list[int]],
                 latents: list[int] | None = None, rows: int = 1 << 30
                 ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(SAE latents [T_i, K], residuals [T_i, d_model]) of each sequence of one batch, on CPU.

    `latents` keeps only those columns (K = len(latents), default all); `rows` bounds the
    tokens encoded at once, so a long sequence never materialises [T, d_sae] in one piece.
    """
    dtype = next(sae.parameters()).dtype
    dev = next(sae.parameters()).device
    ids, mask = pad_batch(batch, lm.tokenizer.pad_token_id)
    h = run_to_layer(lm, ids, mask, layer)
    lat = torch.tensor(latents, device=dev) if latents is not None else None
    out = []
    for i, seq in enumerate(batch):
        r = h[i, : len(seq)].to(dev, dtype)  # LM may run in bf16; SAE math in its own dtype
        parts = []
        for s in range(0, len(seq), rows):
            a = sae.encode(r[s: s + rows])
            parts.append((a if lat is None else a[:, lat]).float().cpu())
        out.append((torch.cat(parts) if parts else torch.zeros(0, sae.W_dec.shape[0] if lat is None
                                                                   else len(lat)),
                    r.float().cpu()))
    return out


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


def _ctx(fn: ModelContext | None, lm: LoadedModel) -> contextlib.AbstractContextManager[Any]:
    return fn(lm) if fn is not None else contextlib.nullcontext()


def _paired(base: LoadedModel, final: LoadedModel, sae: Any, cfg: DiffConfig, side_b: Side,
            side_f: Side, fn: ModelContext | None, latents: list[int] | None, rows: int
            ) -> Iterator[tuple[int, tuple[list[Any], list[Any]]]]:
    """(first example index, (base, fine-tuned) `encode_batch` outputs) batch by batch; the
    fine-tuned context is entered per batch so it never wraps a base forward."""
    bs = cfg.batch_size
    for i0 in range(0, len(side_b.ids), bs):
        ab = encode_batch(base, sae, cfg.layer, side_b.ids[i0: i0 + bs], latents, rows)
        with _ctx(fn, final):
            af = encode_batch(final, sae, cfg.layer, side_f.ids[i0: i0 + bs], latents, rows)
        yield i0, (ab, af)


def _check_fit(cfg: DiffConfig, sae: Any, base: LoadedModel) -> None:
    """The SAE fits the model and layer; --contexts-cache fits the SAE and the tokenizer."""
    check_sae(sae, base, cfg.layer)
    if cfg.contexts_cache:
        from saediff.diff.evidence import check_contexts_cache
        from saediff.models import tokenizer_fingerprint

        check_contexts_cache(cfg.contexts_cache, sae, cfg.layer,
                             tokenizer_fingerprint(base.tokenizer))


def run_diff(cfg: DiffConfig, finetuned_context: ModelContext | None = None,
             labeler: Labeler | None = None) -> DiffResult:
    """Load models and SAE, measure both sides, rank latents, gather evidence and directions.

    `finetuned_context(lm)` is entered around every fine-tuned-side forward pass (e.g. a latent
    clamp for a rerouting check). `labeler(row, response)` labels sampled responses (1 =
    misaligned, 0 = aligned) for the labelled difference-in-means direction and AUROC.
    """
    from saediff.diff.evidence import collect_evidence

    if cfg.out:
        check_writable_dir(cfg.out)  # before any model runs
    rows = load_prompts(cfg.prompts, cfg)
    sae = load_sae(cfg.sae, cfg.device)
    require_activation_sae(sae, cfg.sae, "saediff diff")
    sae.eval()
    base = load_model(cfg.base, cfg.base_adapter, device=cfg.device)
    _check_fit(cfg, sae, base)
    ckpts = cfg.checkpoints()
    prompt_induced = not cfg.finetuned and not cfg.finetuned_adapter
    if prompt_induced and (cfg.base_system, cfg.base_prefix) == (cfg.finetuned_system, cfg.finetuned_prefix) \
            and finetuned_context is None:
        raise SaediffError("nothing to diff: no --finetuned model/adapter and both sides use the "
                           "same prompt condition (give --finetuned-system or --finetuned-prefix)")

    def load_ft(i: int) -> LoadedModel:
        if prompt_induced:
            return base
        lm = load_model(ckpts[i][0], ckpts[i][1], device=cfg.device)
        check_same_tokenizer(base, lm)
        return lm

    final = load_ft(len(ckpts) - 1)
    sampled = None
    if cfg.responses_from in ("base", "finetuned"):
        src = base if cfg.responses_from == "base" else final
        system = cfg.base_system if cfg.responses_from == "base" else cfg.finetuned_system
        ctx = _ctx(finetuned_context, final) if cfg.responses_from == "finetuned" else None
        sampled = sample_responses(src, [r["prompt"] for r in rows], cfg, system, ctx)
    examples = build_examples(rows, cfg, sampled, labeler)
    roles = selected_roles(cfg, examples)
    side_b, side_f = encode_sides(base.tokenizer, examples, cfg, roles)
    check_positions((side_b, side_f), base)
    n_tok = sum(int(m.sum()) for m in side_b.select)
    d_sae = int(sae.W_dec.shape[0])
    budget = cfg.max_memory_gb * 2 ** 30
    n_groups = max(e.group for e in examples) + 1
    # the per-prompt shift table serves every latent's CI; beyond half the budget, the CIs
    # come from the second pass and cover only the latents that fit
    keep_groups = LatentStats.table_bytes(d_sae, n_groups) <= budget / 2
    stats = LatentStats(d_sae, n_groups, cfg.fire_threshold, keep_groups)
    rows_at_once = rows_per_chunk(d_sae, budget)
    label_sums = {0: torch.zeros(base.d_model, dtype=torch.float64),
                  1: torch.zeros(base.d_model, dtype=torch.float64)}
    label_n = {0: [0, 0], 1: [0, 0]}  # examples, tokens
    rsum_b = torch.zeros(base.d_model, dtype=torch.float64)
    rsum_f = torch.zeros_like(rsum_b)
    # pass 1: every latent, streamed; only O(d_sae) sums (and the prompt table) survive a batch
    for i0, (ab, af) in _paired(base, final, sae, cfg, side_b, side_f, finetuned_context,
                                None, rows_at_once):
        for k, ((a_b, r_b), (a_f, r_f)) in enumerate(zip(ab, af)):
            e, mb, mf = examples[i0 + k], side_b.select[i0 + k], side_f.select[i0 + k]
            stats.update(a_b[mb], a_f[mf], torch.full((int(mb.sum()),), e.group))
            rsum_b += r_b[mb].double().sum(0)
            rsum_f += r_f[mf].double().sum(0)
            if e.label is not None:
                label_sums[e.label] += r_f[mf].double().sum(0)
                label_n[e.label][0] += 1
                label_n[e.label][1] += int(mf.sum())
    order = stats.order(cfg.rank_by, cfg.direction).tolist()
    top = order[: cfg.top_k]
    n_ci = d_sae if keep_groups else max(cfg.top_k, min(d_sae, int(budget / 2 / 8 / n_groups)))
    ci_lat = [] if keep_groups else order[:n_ci]
    # pass 2: only the reported latents: their per-token values (evidence, AUROC, trajectory)
    # and, when the prompt table did not fit, their per-prompt sums for the CIs
    keep = list(dict.fromkeys(top + ci_lat))
    col = {j: c for c, j in enumerate(keep)}
    gsum = torch.zeros(n_groups, len(ci_lat), dtype=torch.float64)
    acts_b: list[torch.Tensor] = []
    acts_f: list[torch.Tensor] = []
    ci_cols = torch.tensor([col[j] for j in ci_lat], dtype=torch.long)
    t_cols = torch.tensor([col[j] for j in top], dtype=torch.long)
    for i0, (ab, af) in _paired(base, final, sae, cfg, side_b, side_f, finetuned_context,
                                keep, rows_at_once):
        for k, ((a_b, _), (a_f, _)) in enumerate(zip(ab, af)):
            e, mb, mf = examples[i0 + k], side_b.select[i0 + k], side_f.select[i0 + k]
            if ci_lat:
                gsum[e.group] += (a_f[mf][:, ci_cols].double() - a_b[mb][:, ci_cols].double()).sum(0)
            acts_b.append(a_b[:, t_cols])
            acts_f.append(a_f[:, t_cols])
    if not keep_groups:
        log.warning("per-prompt table of %d latents x %d prompts exceeds --max-memory-gb %.2g: "
                    "confidence intervals cover the top %d latents only (the rest are NaN)",
                    d_sae, n_groups, cfg.max_memory_gb, n_ci)
    table = stats.table(cfg.rank_by, cfg.direction, cfg.n_boot, cfg.ci_level, cfg.seed,
                        group_sums=(ci_lat, gsum) if ci_lat else None)
    log.info("ranked %d latents on %d tokens from %d examples", len(table), n_tok, len(examples))

    # directions: diff-in-means (labels / models), LoRA B, top decoder rows
    w_dec = sae.W_dec.detach().float().cpu()
    cands: list[dirs.Direction] = []
    if label_n[0][0] and label_n[1][0]:
        if not label_n[0][1] or not label_n[1][1]:
            raise SaediffError("difference in means needs tokens on both sides")
        lab = (label_sums[1] / label_n[1][1] - label_sums[0] / label_n[0][1]).float()
        cands.append(dirs.Direction("diff-in-means (misaligned-aligned answers)", "diff_means", lab))
    cands.append(dirs.Direction("diff-in-means (finetuned-base)", "diff_means",
                                ((rsum_f - rsum_b) / n_tok).float()))
    adapters = list(dict.fromkeys([a for a in [ckpts[-1][1], *cfg.lora_adapter] if a]))
    for ad in adapters:
        for d in dirs.lora_b_vectors(ad, cfg.layer, base.d_model):
            if len(adapters) > 1:
                d.name += f" ({Path(ad).name})"
            cands.append(d)
    for j in top[: min(cfg.top_k, 10)]:
        cands.append(dirs.Direction(f"latent {j}", "decoder", w_dec[j]))
    dir_table = dirs.compare(cands, w_dec[top])

    evidence = collect_evidence(cfg, sae, final, table[: cfg.top_k], examples, side_b, side_f,
                                acts_b, acts_f, w_dec, columns=top)
    labels = [e.label for e in examples]
    if any(x is not None for x in labels):
        from saediff.stats import auroc

        for c, ev in enumerate(evidence):
            sign = 1 if ev["direction"] == "up" else -1
            pairs = [(sign * float(a[m][:, c].mean()), lab_) for a, m, lab_ in
                     zip(acts_f, side_f.select, labels) if lab_ is not None and m.any()]
            if len({p[1] for p in pairs}) == 2:  # "answer AUROC": this diff's judged answers
                ev["auroc_labels"] = auroc([p[0] for p in pairs], [p[1] for p in pairs])
                ev["auroc_labels_n"] = len(pairs)
                ev["auroc_labels_positive"] = sum(int(p[1]) for p in pairs)
                ev["auroc_labels_data"] = (
                    "this diff's sampled answers, judge labels" if sampled is not None else
                    f"this diff's answers from the prompts file, its '{cfg.label_field}' labels")

    # trajectory: every checkpoint's shift of the top latents (the final one is already measured)
    traj: dict[str, Any] = {}
    if len(ckpts) > 1:
        seq_index = torch.cat([torch.full((int(m.sum()),), e.group) for e, m in zip(examples, side_b.select)])
        shifts, los, his, names = [], [], [], []
        base_top = _selected(acts_b, side_b)
        for i, (m, a) in enumerate(ckpts):
            if i == len(ckpts) - 1:
                ft_top = _selected(acts_f, side_f)
            else:
                lm = load_ft(i)
                acts_i = latent_activations(lm, sae, cfg.layer, side_f.batches(cfg.batch_size),
                                            _ctx(finetuned_context, lm), latents=top)
                ft_top = _selected(acts_i, side_f)
                del lm, acts_i
                gc.collect()
            sums, counts = group_sums(ft_top - base_top, seq_index)
            lo, hi = bootstrap_mean_ci(sums, counts, cfg.n_boot, cfg.ci_level, cfg.seed)
            shifts.append((ft_top - base_top).mean(0).tolist())
            los.append(lo.tolist())
            his.append(hi.tolist())
            names.append(Path(a).name if a else Path(m).name)
        traj = {"checkpoints": names, "latents": top, "mean_shift": shifts, "ci_low": los,
                "ci_high": his}

    meta = {"n_prompts": len(rows), "n_examples": len(examples), "n_tokens": n_tok,
            "d_sae": int(w_dec.shape[0]), "roles": list(roles), "prompt_induced": prompt_induced,
            "models": {"base": base.provenance(), "finetuned": final.provenance()},
            "checkpoints": [[m, a] for m, a in ckpts],
            "examples": [{"prompt": e.prompt, "response": e.response, "label": e.label}
                         for e in examples[:200]]}
    from saediff.config import config_to_dict

    return DiffResult(table=table, config=config_to_dict(cfg), evidence=evidence,
                      directions=dir_table, trajectory=traj, meta=meta)
