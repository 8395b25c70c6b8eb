"""Layer lists on the command line: `--layers 0-29`, `--layers 6,12,18`, `--layers 0-3,8`.

Shared by cache, train and diff (imports no stage). Parsing refuses empty lists, duplicates,
negative numbers and reversed ranges; `check_layer_range` refuses layers a model lacks, from
its config alone (`config_n_layers`), so a bad list fails before any weights load.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from saediff.errors import SaediffError

_PART = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


def parse_layers(spec: Any, flag: str = "--layers") -> list[int]:
    """`"0-29"`, `"6,12,18"`, `[6, 12]` or `12` -> sorted list of distinct block indices."""
    if isinstance(spec, bool):
        raise SaediffError(f"{flag}: expected layer numbers, got {spec!r}")
    if isinstance(spec, int):
        parts: list[Any] = [spec]
    elif isinstance(spec, (list, tuple)):
        parts = list(spec)
    elif isinstance(spec, str):
        parts = [p for p in spec.split(",")] if spec.strip() else []
    else:
        raise SaediffError(f"{flag}: expected a list like 6,12,18 or a range like 0-29, "
                           f"got {spec!r}")
    out: list[int] = []
    for p in parts:
        if isinstance(p, int) and not isinstance(p, bool):
            if p < 0:
                raise SaediffError(f"{flag}: layer {p} is negative; blocks count from 0")
            out.append(p)
            continue
        m = _PART.match(str(p))
        if not m:
            raise SaediffError(f"{flag}: cannot read {str(p).strip()!r} in {spec!r}; write "
                               "layers as 6,12,18 or ranges as 0-29")
        lo, hi = int(m.group(1)), int(m.group(2) if m.group(2) is not None else m.group(1))
        if hi < lo:
            raise SaediffError(f"{flag}: range {lo}-{hi} runs backwards; write {hi}-{lo}")
        out.extend(range(lo, hi + 1))
    if not out:
        raise SaediffError(f"{flag}: empty layer list; give e.g. --layers 6,12,18 or 0-29")
    dup = sorted({x for x in out if out.count(x) > 1})
    if dup:
        raise SaediffError(f"{flag}: layer(s) {', '.join(map(str, dup))} given more than once "
                           f"in {spec!r}; list each layer once")
    return sorted(out)


def config_n_layers(name_or_path: str | Path) -> int | None:
    """Number of blocks from a local model directory's config.json (None when unknown)."""
    cfg = Path(str(name_or_path)) / "config.json"
    if not cfg.is_file():
        return None
    try:
        c = json.loads(cfg.read_text())
    except (OSError, ValueError):
        return None
    c = c.get("text_config", c) if isinstance(c, dict) else {}
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(c.get(key), int):
            return int(c[key])
    return None


def check_layer_range(layers: list[int], n_layers: int | None, model: str,
                      flag: str = "--layers") -> None:
    """Refuse layers a model with `n_layers` blocks lacks (no-op when the count is unknown)."""
    if n_layers is None:
        return
    bad = [x for x in layers if x >= n_layers]
    if bad:
        what = f"layer {bad[0]}" if len(bad) == 1 else f"layers {', '.join(map(str, bad))}"
        raise SaediffError(f"{flag}: {what} out of range: {model} has {n_layers} blocks "
                           f"(valid {flag} 0..{n_layers - 1})")


def layer_dir(root: str | Path, layer: int) -> Path:
    """Per-layer output directory of a multi-layer run: ROOT/layer_12."""
    return Path(root) / f"layer_{layer}"
