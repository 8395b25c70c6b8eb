"""Outputs of `saediff layers`: layers.json, directions.safetensors and an HTML report with a
line plot per quantity against layer and layer × layer cosine heatmaps (plotly, offline)."""
from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from saediff.io import atomic_path, check_writable_dir, write_json, write_text

OUTPUTS = ("layers.json", "directions.safetensors", "report.html")


def write_layers(res: dict[str, Any], out: str | Path, html_report: bool = True) -> Path:
    """Write the scan into `out`; `res` is `run_layers`' result (its `vectors` go to
    safetensors, every other field to strict JSON)."""
    from safetensors.torch import save_file

    out = check_writable_dir(out)
    if not html_report:
        (out / "report.html").unlink(missing_ok=True)  # no stale report beside a new scan
    body = {k: v for k, v in res.items() if k != "vectors"}
    write_json(out / "layers.json", body)
    with atomic_path(out / "directions.safetensors") as tmp:
        save_file(res["vectors"], str(tmp), metadata={"layers": json.dumps(res["layers"])})
    if html_report:
        write_text(out / "report.html", render(body))
    return out


def _band(fig: Any, x: list[int], s: dict[str, list[Any]], name: str, color: str) -> None:
    import plotly.graph_objects as go

    lo = [v if v is not None else None for v in s["ci_low"]]
    hi = [v if v is not None else None for v in s["ci_high"]]
    fig.add_trace(go.Scatter(x=x + x[::-1], y=hi + lo[::-1], fill="toself", fillcolor=color,
                             opacity=0.2, line={"width": 0}, hoverinfo="skip", showlegend=False))
    fig.add_trace(go.Scatter(x=x, y=s["value"], mode="lines+markers", name=name,
                             line={"color": color}))


COLORS = ("#c0392b", "#2c7fb8", "#27ae60", "#8e44ad", "#e67e22", "#16a085", "#7f8c8d")


def _line(title: str, ytitle: str, x: list[int], series: list[tuple[str, dict[str, Any]]],
          chance: float | None = None) -> Any:
    import plotly.graph_objects as go

    fig = go.Figure()
    for i, (name, s) in enumerate(series):
        if isinstance(s, dict):
            _band(fig, x, s, name, COLORS[i % len(COLORS)])
        else:
            fig.add_trace(go.Scatter(x=x, y=s, mode="lines+markers", name=name,
                                     line={"color": COLORS[i % len(COLORS)]}))
    if chance is not None:
        for y in (chance, -chance):
            fig.add_hline(y=y, line_dash="dot", line_color="#999")
    fig.update_layout(title=title, xaxis_title="layer (block)", yaxis_title=ytitle, height=380)
    return fig


def _heat(title: str, layers: list[int], m: list[list[Any]]) -> Any:
    import plotly.graph_objects as go

    fig = go.Figure(go.Heatmap(z=m, x=layers, y=layers, zmin=-1, zmax=1, colorscale="RdBu",
                               reversescale=True))
    fig.update_layout(title=title, xaxis_title="layer", yaxis_title="layer", height=460,
                      width=520, yaxis={"autorange": "reversed"})
    return fig


def _figures(r: dict[str, Any]) -> list[tuple[str, Any]]:
    x, ft, ch = r["layers"], r["finetunes"], r["chance_abs_cos"]
    figs = [("norm", _line("‖fine-tuned − base‖ (mean-difference direction norm)", "norm", x,
                           [(f, e["ft_minus_base_norm"]) for f, e in ft.items()])),
            ("increment", _line("‖what each block adds to the difference‖ (D[L] − D[L−1])",
                                "norm", x, [(f, e["increment_norm"]) for f, e in ft.items()]))]
    if r["across"]:
        figs.append(("across", _line(
            "cosine of the fine-tuned − base direction across fine-tunes (95% CI)", "cosine", x,
            [(f"{a['a']} vs {a['b']}", a["cos_ft_minus_base"]) for a in r["across"]], ch)))
    if r["labelled"]:
        figs.append(("misaligned-norm", _line("‖misaligned − aligned‖ (labelled answers, inside "
                                              "each model)", "norm", x,
                                              [(m, e["norm"]) for m, e in
                                               r["misaligned_minus_aligned"].items()])))
        if r["across"]:
            figs.append(("across-misaligned", _line(
                "cosine of the misaligned − aligned direction across fine-tunes", "cosine", x,
                [(f"{a['a']} vs {a['b']}", a["cos_misaligned_minus_aligned"])
                 for a in r["across"]], ch)))
        figs.append(("d-vs-m", _line("cosine(fine-tuned − base, misaligned − aligned) per "
                                     "fine-tune", "cosine", x,
                                     [(f, e["cos_ft_minus_base_vs_misaligned"])
                                      for f, e in ft.items()], ch)))
    lora = [(f"{f}: {k}", [None if not per else per[0][k] for per in e["lora_b"]])
            for f, e in ft.items() if e["lora_b"] for k in ("abs_cos_ft_minus_base",)]
    if lora:
        figs.append(("lora", _line("|cosine(LoRA B top vector, fine-tuned − base)|", "|cosine|",
                                   x, lora, ch)))
    for f, e in ft.items():
        figs.append((f"heat-{f}", _heat(f"{f}: layer × layer cosine of fine-tuned − base", x,
                                        e["layer_cosines"])))
    return figs


def _table(r: dict[str, Any]) -> str:
    head = ["layer"] + [f"‖D‖ {f}" for f in r["finetunes"]] + \
        [f"cos D {a['a']}·{a['b']} [CI]" for a in r["across"]]
    rows = []
    for k, layer in enumerate(r["layers"]):
        cells = [str(layer)] + [_fmt(e["ft_minus_base_norm"]["value"][k])
                                for e in r["finetunes"].values()]
        for a in r["across"]:
            s = a["cos_ft_minus_base"]
            cells.append(f"{_fmt(s['value'][k])} [{_fmt(s['ci_low'][k])}, {_fmt(s['ci_high'][k])}]")
        rows.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    return ("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"
            + "".join(rows) + "</table>")


def _fmt(v: Any) -> str:
    return "—" if v is None else f"{v:.3f}"


def render(r: dict[str, Any]) -> str:
    """The report as one self-contained HTML string."""
    from plotly.offline import get_plotlyjs

    from saediff.diff.report import CSS, ERROR_HOOK, _fig_html

    meta = r.get("meta", {})
    cfg = meta.get("config", {})
    parts = ["<h1>saediff layers — per-layer directions</h1>",
             '<div id="saediff-js-errors" data-count="0"></div>',
             f"<p class='muted'>base {html.escape(str(cfg.get('base')))} | fine-tunes: "
             + html.escape(", ".join(f"{f['name']} ({f['adapter'] or f['model']})"
                                     for f in meta.get("finetunes", [])))
             + f" | {meta.get('n_prompts')} prompts, {meta.get('n_examples')} examples, "
             f"{meta.get('n_tokens')} tokens | chance |cos| ≈ {r['chance_abs_cos']:.3f} "
             "(dotted lines)</p>"]
    for key, fig in _figures(r):
        parts.append(_fig_html(fig, f"chart-{key}"))
    parts += ["<h2>Per layer</h2>", _table(r)]
    data = json.dumps({k: v for k, v in r.items() if k != "meta"})
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>saediff layers</title>"
            f"<style>{CSS}</style>{ERROR_HOOK}<script>{get_plotlyjs()}</script></head><body>"
            + "\n".join(parts)
            + f"<script type='application/json' id='saediff-data'>{html.escape(data)}</script>"
            + "</body></html>")
