"""Training curves (loss, L0, dead fraction, batch FVU) from metrics.jsonl as one plotly HTML."""
from __future__ import annotations

import json
from pathlib import Path

from saediff.io import atomic_path

PANELS = (("loss", "loss (MSE + aux)"), ("l0", "L0 (active latents / token)"),
          ("dead_frac", "dead latent fraction"), ("fvu_batch", "FVU (training batch)"))


def write_curves(metrics_path: Path, out: Path, title: str | None = None) -> Path | None:
    """Write `out` (self-contained HTML); returns None when there are no metrics."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    metrics_path, out = Path(metrics_path), Path(out)
    if not metrics_path.is_file():
        return None
    rows = [json.loads(ln) for ln in metrics_path.read_text().splitlines() if ln.strip()]
    if not rows:
        return None
    fig = make_subplots(rows=2, cols=2, subplot_titles=[t for _, t in PANELS])
    steps = [r["step"] for r in rows]
    for i, (key, label) in enumerate(PANELS):
        fig.add_trace(go.Scatter(x=steps, y=[r.get(key) for r in rows], mode="lines", name=label),
                      row=i // 2 + 1, col=i % 2 + 1)
    fig.update_xaxes(title_text="step")
    fig.update_layout(title=title or f"SAE training: {metrics_path.parent.name}", height=700,
                      showlegend=False)
    with atomic_path(out) as tmp:
        fig.write_html(tmp, include_plotlyjs=True)
    return out
