"""The HTML report of `saediff compare` (plotly, opens offline)."""
from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from saediff.io import json_dumps, write_text

BOARD_COLUMNS = ("method", "candidate", "auroc", "cos_lora_b", "cos_mean_diff",
                 "misaligned_given_coherent_unsteered", "misaligned_given_coherent_steered",
                 "coherent_rate_steered", "n")
"""One row of OUT/compare.json (the rates named as in docs/metrics.md, per condition)."""


def _f(x: Any) -> str:
    return "—" if x is None else f"{x:.3f}" if isinstance(x, float) else html.escape(str(x))


def _table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{_f(r.get(c))}</td>" for c in cols) + "</tr>"
                   for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def render_compare(summary: dict[str, Any]) -> str:
    import plotly.graph_objects as go
    from plotly.offline import get_plotlyjs

    from saediff.diff.report import CSS, ERROR_HOOK, _fig_html

    board = summary["leaderboard"]
    parts = [f"<h1>saediff compare — layer {summary['layer']}</h1>",
             '<div id="saediff-js-errors" data-count="0"></div>',
             f"<p class='muted'>{summary['n_prompts']} prompts; causal test = ablate the "
             "method's top direction in the fine-tuned model while it answers.</p>",
             "<h2>Leaderboard</h2>",
             _table(board, list(BOARD_COLUMNS))]
    if board:
        def err(r: dict[str, Any], key: str, ci: str) -> tuple[float, float]:
            v = r[key] if r[key] is not None and r[key] == r[key] else 0.0
            return r[ci][1] - v, v - r[ci][0]

        fig = go.Figure()
        for key, name in (("misaligned_given_coherent_steered", "EM rate (ablated)"),
                          ("coherent_rate_steered", "coherent")):
            ci = key + "_ci"
            e = [err(r, key, ci) for r in board]
            fig.add_trace(go.Bar(x=[r["method"] for r in board], y=[r[key] for r in board],
                                 name=name, error_y={"type": "data", "symmetric": False,
                                                     "array": [a for a, _ in e],
                                                     "arrayminus": [b for _, b in e]}))
        fig.add_hline(y=board[0]["misaligned_given_coherent_unsteered"], line_dash="dash",
                      annotation_text="EM unsteered")
        fig.update_layout(barmode="group", height=420, yaxis_range=[0, 1],
                          title="Causal test per method (Wilson 95% CI)")
        parts.append(_fig_html(fig, "chart-leaderboard"))
    mc = summary["method_cosines"]
    if mc["names"]:
        fig = go.Figure(go.Heatmap(z=mc["cosines"], x=mc["names"], y=mc["names"], zmin=-1,
                                   zmax=1, colorscale="RdBu", reversescale=True))
        fig.update_layout(title="Cosine between the methods' top directions", height=420)
        parts += ["<h2>Do the methods agree?</h2>", _fig_html(fig, "chart-cosines")]
    if summary.get("amplification"):
        parts += ["<h2>LoRA amplification</h2>",
                  _table(summary["amplification"], ["alpha", "misaligned_given_coherent",
                                                   "coherent_rate", "n"])]
    lz = summary.get("lenses", {})
    parts += ["<h2>Where the models differ (token lenses)</h2>",
              "<p>Largest ‖x_ft − x_base‖ tokens</p>",
              _table(lz.get("diff_norm_top", []), ["value", "token", "seq", "pos"])]
    if "kl_top" in lz:
        parts += [f"<p>Largest KL(ft ‖ base) tokens (mean {lz['kl_mean']:.4f} nats)</p>",
                  _table(lz["kl_top"], ["value", "token", "context"]),
                  "<p>Tokens by mean KL (≥ 3 occurrences)</p>",
                  _table(lz["kl_by_token"], ["token", "mean_kl", "count"])]
    data = json_dumps(summary, default=str)
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>saediff compare</title>"
            f"<style>{CSS}</style>{ERROR_HOOK}<script>{get_plotlyjs()}</script></head><body>"
            + "\n".join(parts)
            + f"<script type='application/json' id='saediff-data'>{html.escape(data)}</script>"
            + "</body></html>")


def write_compare_report(summary: dict[str, Any], path: str | Path) -> Path:
    write_text(path, render_compare(summary))
    return Path(path)
