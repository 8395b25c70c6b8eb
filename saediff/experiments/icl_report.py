"""Tables (CLI) and the plotly figure of `saediff experiment icl`'s result."""
from __future__ import annotations

from typing import Any

from saediff.experiments.common import ci_error_bars as error_bars
from saediff.experiments.common import finite


def _fmt(v: Any, ci: Any = None) -> str:
    if v is None:
        return "—"
    s = f"{v:+.3f}" if isinstance(v, float) else str(v)
    if ci and None not in ci:
        s += f" [{ci[0]:+.3f}, {ci[1]:+.3f}]"
    return s


def _beh(b: dict[str, Any] | None) -> str:
    if not b:
        return "—"
    s = _fmt(finite(b["value"]), b.get("ci"))
    if b.get("coherent_rate") is not None:
        s += f" coh {b['coherent_rate']:.2f}"
    return s


def summary_lines(res: dict[str, Any]) -> list[str]:
    """Dose-response per system and condition, the ICL direction's cosines, reach, latents."""
    out = [f"layer {res['layer']}, {res['n_questions']} questions, pool {res['pool']}, "
           f"fine-tune direction {res['fine_tune_direction']}, behaviour {res['behaviour']}"]
    for s in res["skipped_ks"]:
        out.append(f"k={s['k']} skipped: {s['tokens']} tokens > {s['positions']} positions")
    for sname, conds in res["dose_response"].items():
        out.append(f"\nsystem prompt: {sname}")
        out.append(f"{'condition':<20}{'k':>3}  {'projection (mis shots)':<30}{'behaviour (mis shots)'}")
        for cname, rows in conds.items():
            for r in rows:
                p = r["projection_misaligned"]
                out.append(f"{cname:<20}{r['k']:>3}  {_fmt(p['mean'], p['ci']):<30}"
                           f"{_beh(r['behaviour_misaligned'])}")
        for key, v in res["reach"][sname].items():
            out.append(f"base reaches the unprompted fine-tune's {key} "
                       f"({_fmt(finite(v['finetuned_unprompted']))}): "
                       + (f"k = {v['k']}" if v["reached"] else "not reached"))
    first = next(iter(res["dose_response"].values()))["base"]
    out.append("\nICL direction (base, misaligned − aligned shots): cosine [CI] per k")
    for r in first:
        if "icl_cosines" in r:
            cells = ", ".join(f"{n} {_fmt(c['cos'], c['ci'])}" for n, c in r["icl_cosines"].items())
            out.append(f"k={r['k']:>2} |v|={r['icl_norm']:.3f}: {cells}")
    lat = res["latents"]
    if lat["icl_top"]:
        out.append(f"\ntop latents moved by {lat['k']} shots: "
                   + ", ".join(f"{r['latent']} ({r['mean_shift']:+.3f})" for r in lat["icl_top"][:5]))
        out.append("fine-tune's top latents: "
                   + ", ".join(f"{r['latent']} ({r['mean_shift']:+.3f})" for r in lat["finetune_top"][:5]))
        ov = lat["overlap"]
        out.append(f"overlap: {ov['n_shared']}/{ov['of']} shared {ov['shared']}; the fine-tune's "
                   f"top latent ranks {ov['finetune_top_latent_rank_in_icl']} among the ICL top")
        for c, v in lat["reroute"].items():
            if v["icl_top"]:
                out.append(f"{c}: ICL now moves " + ", ".join(
                    f"{r['latent']} ({r['mean_shift']:+.3f})" for r in v["icl_top"][:5]))
    return out


def figure(res: dict[str, Any]) -> Any:
    """2x2: projection vs k, behaviour vs k (per condition), ICL cosines vs k, systems."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=2, cols=2, subplot_titles=[
        "projection on the fine-tune's direction (misaligned shots)", "behaviour vs k",
        "ICL direction (base): cosine to references", "system prompts: behaviour vs k"])
    conds = next(iter(res["dose_response"].values()))
    for cname, rows in conds.items():
        ks = [r["k"] for r in rows]
        p = [finite(r["projection_misaligned"]["mean"]) for r in rows]
        fig.add_trace(go.Scatter(x=ks, y=p, name=f"{cname} projection", mode="lines+markers",
                                 error_y=error_bars(p, [r["projection_misaligned"]["ci"] for r in rows])),
                      row=1, col=1)
        beh = [r["behaviour_misaligned"] for r in rows]
        if all(beh):
            y = [finite(b["value"]) for b in beh]
            fig.add_trace(go.Scatter(x=ks, y=y, name=f"{cname} behaviour", mode="lines+markers",
                                     error_y=error_bars(y, [b["ci"] for b in beh])), row=1, col=2)
    base = conds["base"]
    names = next((list(r["icl_cosines"]) for r in base if "icl_cosines" in r), [])
    for n in names:
        rows = [r for r in base if "icl_cosines" in r]
        y = [finite(r["icl_cosines"][n]["cos"]) for r in rows]
        fig.add_trace(go.Scatter(x=[r["k"] for r in rows], y=y, name=f"cos to {n}",
                                 mode="lines+markers",
                                 error_y=error_bars(y, [r["icl_cosines"][n]["ci"] for r in rows])),
                      row=2, col=1)
    for sname, cs in res["dose_response"].items():
        for cname in ("base", "finetuned"):
            beh = [r["behaviour_misaligned"] for r in cs[cname]]
            if all(beh):
                fig.add_trace(go.Scatter(x=[r["k"] for r in cs[cname]],
                                         y=[finite(b["value"]) for b in beh],
                                         name=f"{cname}, system {sname}", mode="lines+markers"),
                              row=2, col=2)
    fig.update_xaxes(title_text="in-context examples k")
    fig.update_layout(title="In-context EM vs the fine-tune", height=900, template="plotly_white")
    return fig
