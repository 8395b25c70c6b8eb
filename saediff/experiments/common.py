"""Conventions every experiment shares: `result.json`, a self-contained HTML plot, rates with CIs.

`result.json` = {"experiment", "config" (the dataclass, enough to rerun), "seeds",
"conditions" (one dict of metrics per condition, each rate with its CI), "seconds",
"saediff_version", ...experiment-specific keys}; written atomically through `saediff.io`,
NaN as null. `plot.html` inlines plotly.js once and opens offline.
"""
from __future__ import annotations

import html
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from saediff.io import atomic_path, check_writable_dir, write_json, write_text

RESULT_FILE = "result.json"
PLOT_FILE = "plot.html"


def prepare_out(out_dir: str | Path | None) -> Path | None:
    """Create `out_dir` and prove it writable before any model runs (exit 2 otherwise);
    None: write nothing."""
    return check_writable_dir(out_dir) if out_dir else None


def write_result(out_dir: str | Path, result: dict[str, Any]) -> Path:
    """`out_dir/result.json` (atomic; NaN -> null); `result` gains the saediff version."""
    from saediff import __version__

    result.setdefault("saediff_version", __version__)
    path = Path(out_dir) / RESULT_FILE
    write_json(path, result)
    return path


def write_plot(out_dir: str | Path, figures: Sequence[Any], title: str = "saediff experiment",
               notes: str = "") -> Path:
    """`out_dir/plot.html`: the plotly figures one below the other, plotly.js inlined once."""
    from plotly.offline import get_plotlyjs

    divs = [fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"chart-{i}",
                        config={"displaylogo": False, "responsive": True})
            for i, fig in enumerate(figures)]
    page = ("<!DOCTYPE html><html><head><meta charset='utf-8'>"
            f"<title>{html.escape(title)}</title><script>{get_plotlyjs()}</script></head>"
            f"<body style='font-family:system-ui,sans-serif;margin:24px'><h1>{html.escape(title)}"
            f"</h1><p>{html.escape(notes)}</p>" + "\n".join(divs) + "</body></html>")
    path = Path(out_dir) / PLOT_FILE
    write_text(path, page)
    return path


def rate(k: int, n: int) -> dict[str, Any]:
    """{"rate", "ci" (95% Wilson), "k", "n"}; rate NaN (-> null) when n is 0."""
    from saediff.judges import wilson

    lo, hi = wilson(int(k), int(n))
    return {"rate": k / n if n else float("nan"), "ci": [lo, hi], "k": int(k), "n": int(n)}


def centre(metric: dict[str, Any]) -> float:
    """The point estimate of a {"rate"|"score", "ci"} metric (NaN when missing)."""
    v = metric.get("rate", metric.get("score"))
    return float("nan") if v is None else float(v)


def error_bars(metrics: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """plotly `error_y` for a list of {"rate"|"score", "ci": [lo, hi]} metrics."""
    return {"type": "data", "symmetric": False,
            "array": [m["ci"][1] - centre(m) for m in metrics],
            "arrayminus": [centre(m) - m["ci"][0] for m in metrics]}


def write_figure(fig: Any, path: Path) -> Path:
    """A plotly figure as one self-contained HTML file, atomically."""
    with atomic_path(path) as tmp:
        fig.write_html(str(tmp), include_plotlyjs=True, full_html=True)
    return path


def finite(x: Any) -> float | None:
    """A float for JSON and plots: None for NaN / inf / None."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def ci_error_bars(values: Sequence[float | None], cis: Sequence[Sequence[float | None]]
                  ) -> dict[str, Any]:
    """plotly `error_y` for asymmetric CIs around `values` (missing values give 0 bars)."""
    up, down = [], []
    for v, (lo, hi) in zip(values, cis):
        ok = None not in (v, lo, hi)
        up.append(hi - v if ok else 0.0)  # type: ignore[operator]
        down.append(v - lo if ok else 0.0)  # type: ignore[operator]
    return dict(type="data", symmetric=False, array=up, arrayminus=down)
