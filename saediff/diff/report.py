"""Self-contained HTML report of a diff (plotly.js inlined once; opens offline)."""
from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from saediff.io import json_dumps, write_text

ERROR_HOOK = """<script>
window.__saediffErrors = [];
function __saediffErr(msg) {
  window.__saediffErrors.push(String(msg));
  var el = document.getElementById('saediff-js-errors');
  if (el) { el.setAttribute('data-count', window.__saediffErrors.length);
            el.textContent = 'JS errors: ' + window.__saediffErrors.join(' | '); }
}
window.onerror = function (m, src, line) { __saediffErr(m + ' @' + line); };
window.addEventListener('unhandledrejection', function (e) { __saediffErr(e.reason); });
</script>"""

CSS = """body{font-family:system-ui,sans-serif;margin:24px;max-width:1200px;color:#222}
h1{font-size:1.5em} h2{border-bottom:1px solid #ccc;padding-bottom:4px;margin-top:2em}
table{border-collapse:collapse;font-size:0.85em} td,th{border:1px solid #ddd;padding:3px 6px;text-align:right}
.ctx{font-family:monospace;font-size:0.85em;line-height:1.9;margin:4px 0;padding:4px;background:#fafafa}
.tok{padding:1px 2px;border-radius:2px;margin-right:1px} .peak{outline:1px solid #c00}
.latent{border:1px solid #ddd;border-radius:6px;padding:8px 14px;margin:12px 0}
.muted{color:#777;font-size:0.85em} #saediff-js-errors{color:#b00}"""


def _fig_html(fig: Any, div_id: str) -> str:
    return fig.to_html(full_html=False, include_plotlyjs=False, div_id=div_id,
                       config={"displaylogo": False, "responsive": True})


def _bar(table: list[dict[str, Any]], n: int = 30) -> Any:
    import plotly.graph_objects as go

    rows = table[:n]
    x = [f"#{r['latent']}" for r in rows]
    y = [r["mean_shift"] for r in rows]
    fig = go.Figure(go.Bar(
        x=x, y=y, marker_color=["#c0392b" if v >= 0 else "#2c7fb8" for v in y],
        error_y={"type": "data", "symmetric": False,
                 "array": [r["ci_high"] - r["mean_shift"] for r in rows],
                 "arrayminus": [r["mean_shift"] - r["ci_low"] for r in rows]},
        hovertext=[f"rank {r['rank']} freqΔ {r['freq_shift']:.3f} normΔ {r['norm_shift']:.3f}"
                   for r in rows]))
    fig.update_layout(title="Top latents by activation shift (fine-tuned − base), bootstrap CI",
                      xaxis_title="latent", yaxis_title="mean shift", height=420)
    return fig


def _scatter(table: list[dict[str, Any]], top_k: int) -> Any:
    import plotly.graph_objects as go

    top = table[:top_k]
    rest = table[top_k:]
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[r["mean_base"] for r in rest], y=[r["mean_finetuned"] for r in rest],
                             mode="markers", name="other latents", marker={"size": 4, "color": "#aaa"},
                             text=[f"#{r['latent']}" for r in rest]))
    fig.add_trace(go.Scatter(x=[r["mean_base"] for r in top], y=[r["mean_finetuned"] for r in top],
                             mode="markers+text", name=f"top {top_k}",
                             marker={"size": 9, "color": "#c0392b"},
                             text=[f"#{r['latent']}" for r in top], textposition="top center"))
    hi = max([max(r["mean_base"], r["mean_finetuned"]) for r in table] + [1e-6])
    fig.add_trace(go.Scatter(x=[0, hi], y=[0, hi], mode="lines", name="y = x",
                             line={"dash": "dot", "color": "#555"}))
    fig.update_layout(title="Mean activation per latent: base vs fine-tuned",
                      xaxis_title="base", yaxis_title="fine-tuned", height=480)
    return fig


def _hist(ev: dict[str, Any]) -> Any:
    import plotly.graph_objects as go

    fig = go.Figure()
    for side, color in (("base", "#2c7fb8"), ("finetuned", "#c0392b")):
        h = ev["hist"][side]
        mids = [(a + b) / 2 for a, b in zip(h["edges"][:-1], h["edges"][1:])]
        fig.add_trace(go.Bar(x=mids, y=h["counts"], name=side, marker_color=color, opacity=0.6))
    fig.update_layout(barmode="overlay", height=260, margin={"t": 30, "b": 30},
                      title=f"latent {ev['latent']}: non-zero activations "
                            f"(zero: base {ev['hist']['zero_frac_base']:.0%}, "
                            f"fine-tuned {ev['hist']['zero_frac_finetuned']:.0%})")
    return fig


def _heatmap(d: dict[str, Any]) -> Any:
    import plotly.graph_objects as go

    names = d["names"]
    fig = go.Figure(go.Heatmap(z=d["cosines"], x=names, y=names, zmin=-1, zmax=1,
                               colorscale="RdBu", reversescale=True,
                               text=[[f"{v:.2f}" for v in row] for row in d["cosines"]],
                               texttemplate="%{text}"))
    fig.update_layout(title="Cosine similarity of candidate directions", height=200 + 40 * len(names),
                      yaxis={"autorange": "reversed"})
    return fig


def _trajectory(t: dict[str, Any]) -> Any:
    import plotly.graph_objects as go

    fig = go.Figure()
    for c, j in enumerate(t["latents"]):
        fig.add_trace(go.Scatter(
            x=t["checkpoints"], y=[s[c] for s in t["mean_shift"]], mode="lines+markers",
            name=f"#{j}", error_y={"type": "data", "symmetric": False,
                                   "array": [h[c] - s[c] for h, s in zip(t["ci_high"], t["mean_shift"])],
                                   "arrayminus": [s[c] - lo[c] for lo, s in zip(t["ci_low"], t["mean_shift"])]}))
    fig.update_layout(title="Shift of the top latents per fine-tuned checkpoint",
                      xaxis_title="checkpoint", yaxis_title="mean shift", height=420)
    return fig


def _context_html(ctx: dict[str, Any]) -> str:
    key = "acts_finetuned" if "acts_finetuned" in ctx else "acts_base"
    acts = ctx[key]
    peak = max([abs(a) for a in acts] + [1e-9])
    spans = []
    for i, (t, a) in enumerate(zip(ctx["tokens"], acts)):
        alpha = max(0.0, min(1.0, a / peak))
        title = f"{key[5:]}={a:.3f}" + (f" base={ctx['acts_base'][i]:.3f}" if "acts_base" in ctx
                                         and key != "acts_base" else "")
        cls = "tok peak" if i == ctx.get("peak_pos") else "tok"
        spans.append(f'<span class="{cls}" style="background:rgba(230,80,40,{alpha:.2f})" '
                     f'title="{html.escape(title)}">{html.escape(t)}</span>')
    src = ctx.get("source", "diff set")
    return f'<div class="ctx"><span class="muted">peak {ctx["peak"]:.3f} ({src})</span> {"".join(spans)}</div>'


def _ranking_table(table: list[dict[str, Any]], n: int = 20) -> str:
    cols = ("rank", "latent", "mean_shift", "ci_low", "ci_high", "direction", "freq_base",
            "freq_finetuned", "norm_shift")
    head = "".join(f"<th>{c}</th>" for c in cols)
    body = "".join("<tr>" + "".join(
        f"<td>{r[c]:.4f}</td>" if isinstance(r[c], float) else f"<td>{r[c]}</td>" for c in cols)
        + "</tr>" for r in table[:n])
    return f"<table><tr>{head}</tr>{body}</table>"


def render_report(res: Any) -> str:
    """The report as one HTML string."""
    from plotly.offline import get_plotlyjs

    cfg, meta = res.config, res.meta
    ckpts = ", ".join(f"{m} {a or ''}".strip() for m, a in meta.get("checkpoints", []))
    parts = [f"<h1>saediff diff — layer {cfg.get('layer')}</h1>",
             '<div id="saediff-js-errors" data-count="0"></div>',
             f"<p class='muted'>base: {html.escape(str(cfg.get('base')))} "
             f"{html.escape(str(cfg.get('base_adapter') or ''))} | fine-tuned: "
             f"{html.escape(ckpts)}"
             f" | SAE: {html.escape(str(cfg.get('sae')))} | {meta.get('n_prompts')} prompts, "
             f"{meta.get('n_examples')} examples, {meta.get('n_tokens')} tokens"
             f"{' | prompt-induced' if meta.get('prompt_induced') else ''}</p>",
             "<h2>Ranking</h2>", _fig_html(_bar(res.table), "chart-ranking"),
             _ranking_table(res.table),
             _fig_html(_scatter(res.table, min(cfg.get("top_k", 10), len(res.table))), "chart-scatter")]
    if res.directions.get("names"):
        parts += ["<h2>Directions</h2>", _fig_html(_heatmap(res.directions), "chart-directions")]
        span = res.directions.get("span_explained", {})
        if span:
            ks = sorted({k for v in span.values() for k in v}, key=int)
            rows = "".join(
                f"<tr><td style='text-align:left'>{html.escape(n)}</td>"
                + "".join(f"<td>{v[k]:.3f}</td>" if k in v else "<td></td>" for k in ks) + "</tr>"
                for n, v in span.items())
            parts.append("<p>Fraction of each direction's squared norm inside the span of the "
                         "top-k decoder directions:</p><table><tr><th>direction</th>"
                         + "".join(f"<th>k={k}</th>" for k in ks) + f"</tr>{rows}</table>")
    if res.trajectory:
        parts += ["<h2>Trajectory</h2>", _fig_html(_trajectory(res.trajectory), "chart-trajectory")]
    parts.append("<h2>Evidence per latent</h2><p class='muted'>Ranked by mean activation shift "
                 "base → fine-tuned (not by AUROC); the answer AUROC scores the latent's mean "
                 "activation per sampled answer against the judge's misaligned/aligned label, "
                 "signed by its shift direction.</p>")
    for ev in res.evidence:
        lt = ev["logit_tokens"]
        promo = ", ".join(html.escape(f"{t} ({v:+.2f})") for t, v in lt.get("promoted", []))
        supp = ", ".join(html.escape(f"{t} ({v:+.2f})") for t, v in lt.get("suppressed", []))
        au = (f" | answer AUROC {ev['auroc_labels']:.3f} ({ev.get('auroc_labels_data', 'labelled answers')}"
              f", n={ev.get('auroc_labels_n', '?')}, {ev.get('auroc_labels_positive', '?')} "
              "misaligned)" if "auroc_labels" in ev else "")
        parts.append(f'<div class="latent" id="latent-{ev["latent"]}"><h3>#{ev["rank"]}: latent '
                     f'{ev["latent"]} ({ev["direction"]}, shift {ev["mean_shift"]:.4f} '
                     f'[{ev["ci_low"]:.4f}, {ev["ci_high"]:.4f}]{au})</h3>'
                     f"<p><b>promotes</b>: {promo}<br><b>suppresses</b>: {supp}</p>"
                     f"<p class='muted'>top contexts ({ev['contexts_source']}; hover a token for its "
                     "activation)</p>" + "".join(_context_html(c) for c in ev["contexts"] or [])
                     + _fig_html(_hist(ev), f"chart-hist-{ev['latent']}") + "</div>")
    data = json_dumps({"config": cfg, "directions": res.directions}, default=str)
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>saediff diff report</title>"
            f"<style>{CSS}</style>{ERROR_HOOK}<script>{get_plotlyjs()}</script></head><body>"
            + "\n".join(parts)
            + f"<script type='application/json' id='saediff-data'>{html.escape(data)}</script>"
            + "</body></html>")


def write_report(res: Any, path: str | Path) -> Path:
    path = Path(path)
    write_text(path, render_report(res))
    return path
