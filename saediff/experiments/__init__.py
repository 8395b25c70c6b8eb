"""Stage 6 — experiments: studies that tie the stages together (may import every stage;
nothing imports this package).

A tiny registry: `EXPERIMENTS` maps a name to the module that runs it. Each module has
`CONFIG` (its config dataclass; field docstrings are the CLI help), `HELP` (one line),
`run(cfg) -> dict` (writes `cfg.out` when set) and `summary_lines(result) -> list[str]`
(what the CLI prints). `saediff experiment <name> ...` is built from it.
"""
from __future__ import annotations

import importlib
from types import ModuleType

EXPERIMENTS: dict[str, str] = {
    "icl": "saediff.experiments.icl",
}


def experiment_module(name: str) -> ModuleType:
    """The module of experiment `name` (KeyError names the known ones)."""
    if name not in EXPERIMENTS:
        raise KeyError(f"unknown experiment {name!r}; known: {', '.join(sorted(EXPERIMENTS))}")
    return importlib.import_module(EXPERIMENTS[name])


__all__ = ["EXPERIMENTS", "experiment_module"]
