"""Result and plot conventions shared by the experiments.

Every experiment writes `OUT/result.json` (strict JSON through `saediff.io`, NaN as null) with
its config, seeds and the saediff version recorded beside the numbers, and one self-contained
plotly HTML (plotly.js inlined, opens offline).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from saediff.io import atomic_path, check_writable_dir, write_json

RESULT = "result.json"


def prepare_out(out: str | Path | None) -> Path | None:
    """The output directory, proven writable before any model runs (None: write nothing)."""
    return check_writable_dir(out) if out else None


def write_result(out: Path, name: str, result: dict[str, Any], config: dict[str, Any],
                 seeds: dict[str, int]) -> Path:
    """`out/result.json` = {experiment, version, config, seeds, **result}, atomically."""
    from saediff import __version__

    path = out / RESULT
    write_json(path, {"experiment": name, "version": __version__, "config": config,
                      "seeds": seeds, **result})
    return path


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


def error_bars(values: list[float | None], cis: list[list[float | None]]) -> dict[str, Any]:
    """plotly `error_y` for asymmetric CIs around `values` (missing values give 0 bars)."""
    up, down = [], []
    for v, (lo, hi) in zip(values, cis):
        ok = None not in (v, lo, hi)
        up.append(hi - v if ok else 0.0)  # type: ignore[operator]
        down.append(v - lo if ok else 0.0)  # type: ignore[operator]
    return dict(type="data", symmetric=False, array=up, arrayminus=down)
