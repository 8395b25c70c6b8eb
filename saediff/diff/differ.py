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
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import saediff.diff.directions as dirs
from saediff.diff.data import (DiffConfig, Example, Labeler, ModelContext, Side, build_examples,
                              encode_sides, load_prompts, sample_responses, selected_roles)
from saediff.errors import SaediffError
from saediff.models import LoadedModel, check_same_tokenizer, load_model, pad_batch, run_to_layer
from saediff.stats import bootstrap_mean_ci, group_sums
from saediff.sae import check_sae, load_sae

log = logging.getLogger(__name__)
TABLE_FIELDS = ("rank", "latent", "mean_shift", "ci_low", "ci_high", "direction", "mean_base",
                "mean_finetuned", "freq_base", "freq_finetuned", "freq_shift", "typical_act",
                "norm_shift", "significant")


@torch.no_grad()
def latent_activations(lm: LoadedModel, sae: Any, layer: int,
                       token_batches: Iterable[list[list[int]]],
                       context: contextlib.AbstractContextManager[Any] | None = None,
                       return_resid: bool = False) -> Any:
    """SAE latents of the residual stream after block `layer`, one [T_i, d_sae] tensor per sequence.

    `token_batches` yields lists of token-id lists (right-padded here; padding never reaches
    the result). With `return_resid`, also returns the [T_i, d_model] residuals.
    `context` (e.g. a steering hook) is entered around the forward passes.
    """
    acts, resids = [], []
    dtype = next(sae.parameters()).dtype
    dev = next(sae.parameters()).device
    with context or contextlib.nullcontext():
        for batch in token_batches:
            ids, mask = pad_batch(batch, lm.tokenizer.pad_token_id)
            h = run_to_layer(lm, ids, mask, layer)
            for i, seq in enumerate(batch):
                r = h[i, : len(seq)].to(dev, dtype)
                acts.append(sae.encode(r).float().cpu())
                if return_resid:
                    resids.append(r.float().cpu())
    return (acts, resids) if return_resid else acts


def rank_latents(acts_base: torch.Tensor, acts_ft: torch.Tensor, seq_index: torch.Tensor,
                 rank_by: str = "mean_shift", direction: str = "both", n_boot: int = 1000,
                 ci_level: float = 0.95, fire_threshold: float = 0.0, seed: int = 0,
                 chunk: int = 4096) -> list[dict[str, Any]]:
    """Rank latents by their shift between paired token activations [N, d_sae] of two sides.

    `seq_index` [N] gives each token's group (prompt); the CI resamples groups. Returns one
    row per latent, sorted by rank (1 = largest shift in the requested direction).
    """
    if acts_base.shape != acts_ft.shape:
        raise SaediffError(f"paired activations differ in shape: {tuple(acts_base.shape)} vs "
                           f"{tuple(acts_ft.shape)}")
    if acts_base.shape[0] == 0:
        raise SaediffError("no tokens to rank latents on")
    k = acts_base.shape[1]
    groups = torch.unique(seq_index.long(), return_inverse=True)[1]
    mb, mf, fb, ff, typical = (torch.empty(k, dtype=torch.float64) for _ in range(5))
    lo, hi = torch.empty(k), torch.empty(k)
    for s in range(0, k, chunk):  # latent chunks keep memory at tokens x chunk
        a, b = acts_base[:, s: s + chunk].double(), acts_ft[:, s: s + chunk].double()
        mb[s: s + chunk], mf[s: s + chunk] = a.mean(0), b.mean(0)
        on_a, on_b = a > fire_threshold, b > fire_threshold
        fb[s: s + chunk], ff[s: s + chunk] = on_a.double().mean(0), on_b.double().mean(0)
        n_on = on_a.sum(0) + on_b.sum(0)
        tot = (a * on_a).sum(0) + (b * on_b).sum(0)
        typical[s: s + chunk] = torch.where(n_on > 0, tot / n_on.clamp_min(1), torch.zeros_like(tot))
        sums, counts = group_sums(b - a, groups)
        lo[s: s + chunk], hi[s: s + chunk] = bootstrap_mean_ci(sums, counts, n_boot, ci_level, seed)
    shift = mf - mb
    norm_shift = torch.where(typical > 0, shift / typical.clamp_min(1e-12), torch.zeros_like(shift))
    stat = {"mean_shift": shift, "norm_shift": norm_shift, "freq_shift": ff - fb}[rank_by]
    score = {"both": stat.abs(), "up": stat, "down": -stat}[direction]
    order = torch.argsort(score, descending=True, stable=True)
    rows = []
    for r, j in enumerate(order.tolist()):
        rows.append({"rank": r + 1, "latent": j, "mean_shift": float(shift[j]),
                     "ci_low": float(lo[j]), "ci_high": float(hi[j]),
                     "direction": "up" if shift[j] >= 0 else "down",
                     "mean_base": float(mb[j]), "mean_finetuned": float(mf[j]),
                     "freq_base": float(fb[j]), "freq_finetuned": float(ff[j]),
                     "freq_shift": float(ff[j] - fb[j]), "typical_act": float(typical[j]),
                     "norm_shift": float(norm_shift[j]),
                     "significant": bool(lo[j] > 0 or hi[j] < 0)})
    return rows


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
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        _write(out / "ranking.json", json.dumps(self.table, indent=1))
        tmp = out / "ranking.csv.tmp"
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(TABLE_FIELDS))
            w.writeheader()
            w.writerows({k: r[k] for k in TABLE_FIELDS} for r in self.table)
        os.replace(tmp, out / "ranking.csv")
        if len(self.directions.get("names", [])) > 1:
            _write(out / "directions.json", json.dumps(self.directions, indent=1))
        _write(out / "evidence.json", json.dumps(self.evidence, indent=1))
        if self.trajectory:
            _write(out / "trajectory.json", json.dumps(self.trajectory, indent=1))
        _write(out / "meta.json", json.dumps({"config": self.config, **self.meta,
                                              "trajectory": self.trajectory}, indent=1))
        if html:
            from saediff.diff.report import write_report

            write_report(self, out / "report.html")
        return out


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _selected(acts: list[torch.Tensor], side: Side) -> torch.Tensor:
    return torch.cat([a[m] for a, m in zip(acts, side.select)])


def _ctx(fn: ModelContext | None, lm: LoadedModel) -> contextlib.AbstractContextManager[Any]:
    return fn(lm) if fn is not None else contextlib.nullcontext()


def _label_dim(examples: list[Example], resid: list[torch.Tensor], side: Side) -> torch.Tensor | None:
    """Soligo-style diff-in-means inside one model: misaligned minus aligned answers."""
    pos = [r[m] for e, r, m in zip(examples, resid, side.select) if e.label == 1]
    neg = [r[m] for e, r, m in zip(examples, resid, side.select) if e.label == 0]
    if not pos or not neg:
        return None
    return dirs.diff_in_means(torch.cat(pos), torch.cat(neg))


def run_diff(cfg: DiffConfig, finetuned_context: ModelContext | None = None,
             labeler: Labeler | None = None) -> DiffResult:
    """Load models and SAE, measure both sides, rank latents, gather evidence and directions.

    `finetuned_context(lm)` is entered around every fine-tuned-side forward pass (e.g. a latent
    clamp for a rerouting check). `labeler(row, response)` labels sampled responses (1 =
    misaligned, 0 = aligned) for the labelled difference-in-means direction and AUROC.
    """
    from saediff.diff.evidence import collect_evidence

    rows = load_prompts(cfg.prompts, cfg)
    sae = load_sae(cfg.sae, cfg.device)
    sae.eval()
    base = load_model(cfg.base, cfg.base_adapter, device=cfg.device)
    check_sae(sae, base, cfg.layer)
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
    seq_index = torch.cat([torch.full((int(m.sum()),), e.group) for e, m in zip(examples, side_b.select)])

    acts_b, resid_b = latent_activations(base, sae, cfg.layer, side_b.batches(cfg.batch_size),
                                         return_resid=True)
    acts_f, resid_f = latent_activations(final, sae, cfg.layer, side_f.batches(cfg.batch_size),
                                         _ctx(finetuned_context, final), return_resid=True)
    sel_b, sel_f = _selected(acts_b, side_b), _selected(acts_f, side_f)
    table = rank_latents(sel_b, sel_f, seq_index, cfg.rank_by, cfg.direction, cfg.n_boot,
                         cfg.ci_level, cfg.fire_threshold, cfg.seed)
    top = [r["latent"] for r in table[: cfg.top_k]]
    log.info("ranked %d latents on %d tokens from %d examples", len(table), len(seq_index), len(examples))

    # directions: diff-in-means (labels / models), LoRA B, top decoder rows
    w_dec = sae.W_dec.detach().float().cpu()
    cands: list[dirs.Direction] = []
    lab = _label_dim(examples, resid_f, side_f)
    if lab is not None:
        cands.append(dirs.Direction("diff-in-means (misaligned-aligned answers)", "diff_means", lab))
    rb, rf = _selected(resid_b, side_b), _selected(resid_f, side_f)
    cands.append(dirs.Direction("diff-in-means (finetuned-base)", "diff_means",
                                dirs.diff_in_means(rf, rb)))
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
                                acts_b, acts_f, w_dec)
    labels = [e.label for e in examples]
    if any(x is not None for x in labels):
        from saediff.stats import auroc

        for ev in evidence:
            j, sign = ev["latent"], (1 if ev["direction"] == "up" else -1)
            pairs = [(sign * float(a[m][:, j].mean()), lab_) for a, m, lab_ in
                     zip(acts_f, side_f.select, labels) if lab_ is not None and m.any()]
            if len({p[1] for p in pairs}) == 2:
                ev["auroc_labels"] = auroc([p[0] for p in pairs], [p[1] for p in pairs])

    # trajectory: every checkpoint's shift of the top latents (the final one is already measured)
    traj: dict[str, Any] = {}
    if len(ckpts) > 1:
        shifts, los, his, names = [], [], [], []
        base_top = sel_b[:, top]
        for i, (m, a) in enumerate(ckpts):
            if i == len(ckpts) - 1:
                ft_top = sel_f[:, top]
            else:
                lm = load_ft(i)
                acts_i = latent_activations(lm, sae, cfg.layer, side_f.batches(cfg.batch_size),
                                            _ctx(finetuned_context, lm))
                ft_top = _selected(acts_i, side_f)[:, top]
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

    meta = {"n_prompts": len(rows), "n_examples": len(examples), "n_tokens": int(len(seq_index)),
            "d_sae": int(w_dec.shape[0]), "roles": list(roles), "prompt_induced": prompt_induced,
            "models": {"base": base.provenance(), "finetuned": final.provenance()},
            "checkpoints": [[m, a] for m, a in ckpts],
            "examples": [{"prompt": e.prompt, "response": e.response, "label": e.label}
                         for e in examples[:200]]}
    from saediff.config import config_to_dict

    return DiffResult(table=table, config=config_to_dict(cfg), evidence=evidence,
                      directions=dir_table, trajectory=traj, meta=meta)
