"""The rerouting check: once the top latent(s) are clamped in the fine-tuned model, which
latents carry the fine-tune's activation shift instead?

    rep = reroute_check(diff_cfg, latents=[j], clamp=0.0)
    rep["carriers"]    # top latents after the clamp, other than the clamped ones
"""
from __future__ import annotations

from typing import Any

from saediff.errors import SaediffError
from saediff.sae import load_sae
from saediff.steer.hooks import check_latents


def reroute_check(diff_cfg: Any, latents: list[int], clamp: float = 0.0, top: int = 10,
                  before: Any = None, positions: str = "all") -> dict[str, Any]:
    """Re-run the differ with `latents` clamped in the fine-tuned model; report which latents
    now carry the shift.

    `diff_cfg` is a `saediff.diff.data.DiffConfig`; `before` an unsteered `DiffResult` (run
    here if None). The clamp is applied around every fine-tuned forward of the diff (and its
    sampled responses when `responses_from="finetuned"`). Returns the top rows before/after,
    the new carriers (top latents after that were not in the top before), and how much of the
    total |shift| of the top latents remains.
    """
    try:
        from saediff.diff.differ import run_diff
    except ImportError as exc:  # pragma: no cover - the differ ships with saediff
        raise SaediffError(f"the rerouting check needs saediff.diff.differ ({exc})") from exc
    from saediff.steer.hooks import steer

    sae = load_sae(diff_cfg.sae, diff_cfg.device)
    check_latents(sae, latents)
    before = before if before is not None else run_diff(diff_cfg)
    after = run_diff(diff_cfg, finetuned_context=lambda lm: steer(
        lm, sae, latent=latents, clamp=clamp, layer=diff_cfg.layer, positions=positions))
    clamped = set(int(j) for j in latents)

    def rows(res: Any) -> dict[int, dict[str, Any]]:
        return {int(r["latent"]): r for r in res.table}

    rb, ra = rows(before), rows(after)
    top_before = [int(r["latent"]) for r in before.table[:top]]
    top_after = [int(r["latent"]) for r in after.table[:top]]
    carriers = [j for j in top_after if j not in clamped]

    def brief(j: int) -> dict[str, Any]:
        return {"latent": j, "clamped": j in clamped,
                "rank_before": rb[j]["rank"], "shift_before": rb[j]["mean_shift"],
                "rank_after": ra[j]["rank"], "shift_after": ra[j]["mean_shift"],
                "ci_after": [ra[j]["ci_low"], ra[j]["ci_high"]]}

    # the clamped latents always appear: the report shows what the clamp did to them
    union = list(dict.fromkeys(top_before + top_after + sorted(clamped)))
    total_before = sum(abs(rb[j]["mean_shift"]) for j in top_before)
    total_after = sum(abs(ra[j]["mean_shift"]) for j in top_after)
    return {"clamped": sorted(clamped), "clamp": clamp, "top": top,
            "top_before": top_before, "top_after": top_after,
            "carriers": carriers, "new_in_top": [j for j in top_after if j not in top_before],
            "latents": [brief(j) for j in union],
            "top_abs_shift_before": total_before, "top_abs_shift_after": total_after,
            "remaining_fraction": (total_after / total_before) if total_before else None,
            "after_table": after.table[:top]}


def format_reroute(rep: dict[str, Any]) -> str:
    lines = [f"clamped {rep['clamped']} to {rep['clamp']}; top-{rep['top']} |shift| "
             f"{rep['top_abs_shift_before']:.4f} -> {rep['top_abs_shift_after']:.4f}",
             f"{'latent':>7} {'rank0':>6} {'shift0':>9} {'rank1':>6} {'shift1':>9}"]
    for r in rep["latents"]:
        mark = " (clamped)" if r["clamped"] else " (new)" if r["latent"] in rep["new_in_top"] else ""
        lines.append(f"{r['latent']:>7} {r['rank_before']:>6} {r['shift_before']:>9.4f} "
                     f"{r['rank_after']:>6} {r['shift_after']:>9.4f}{mark}")
    lines.append(f"now carrying the shift: {rep['carriers']}")
    return "\n".join(lines)
