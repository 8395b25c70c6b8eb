"""The method interface: `Method.candidates(inputs) -> [Candidate]`, best first."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from saediff.errors import SaediffError


@dataclass
class Candidate:
    """One candidate direction a method proposes."""

    method: str
    name: str
    """e.g. 'latent 17', 'PC1', 'lora_B mlp.down_proj'."""
    vector: torch.Tensor
    """[d_model] in the residual stream, oriented so fine-tuned − base projects positively."""
    score: float
    """The method's own ranking score (larger = stronger candidate)."""
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class MethodInputs:
    """What the methods may read; each method checks that its own inputs are there."""

    layer: int
    d_model: int
    x_base: torch.Tensor | None = None
    """[N, d] paired cache rows (same tokens as x_ft)."""
    x_ft: torch.Tensor | None = None
    sae: str | None = None
    """SAE run directory (trained on base/fine-tuned activations)."""
    crosscoder: str | None = None
    diff_sae: str | None = None
    """SAE run directory trained on fine-tuned − base differences."""
    adapter: str | None = None
    """PEFT adapter directory of the fine-tune."""
    resid: torch.Tensor | None = None
    """[n, d] per-example mean residuals of labelled answers inside the fine-tuned model."""
    labels: torch.Tensor | None = None
    """[n] 1 = misaligned persona, 0 = aligned."""
    rows: dict[str, torch.Tensor] | None = None
    """`paired_rows` of the cache (tokens, seq, positions of x_base / x_ft), for the lenses."""
    base_lm: Any = None
    """The base model (a LoadedModel), for the lenses that run models."""
    ft_lm: Any = None
    """The fine-tuned model (a LoadedModel)."""
    sequences: list[list[int]] | None = None
    """Token ids of whole cache sequences, for the per-token KL lens."""

    def need(self, method: str, *names: str) -> None:
        missing = [n for n in names if getattr(self, n) is None]
        if missing:
            flags = ", ".join("--" + n.replace("_", "-") for n in missing)
            raise SaediffError(f"method {method} needs {flags}")

    @property
    def mean_shift(self) -> torch.Tensor:
        """mean(x_ft − x_base) over the paired rows [d] (orients the candidates)."""
        self.need("orientation", "x_base", "x_ft")
        return (self.x_ft.double() - self.x_base.double()).mean(0).float()  # type: ignore


def orient(v: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """v with the sign that makes it point along ref (a direction has no sign of its own)."""
    return -v if float(v @ ref) < 0 else v


class Method:
    """Base class: subclasses set `name` and implement `candidates` (directions, best first)
    and/or `tokens` (a lens: *where* the models differ, as JSON-safe tables)."""

    name = "?"

    def candidates(self, inputs: MethodInputs, top: int = 5) -> list[Candidate]:
        """Ranked candidate directions; a pure lens proposes none."""
        return []

    def tokens(self, inputs: MethodInputs, k: int = 15) -> dict[str, Any]:
        """Per-token tables of a lens; a direction method shows none."""
        return {}


def paired_rows(cache: str | Path, max_rows: int = 200_000, roles: list[str] | None = None
                ) -> dict[str, torch.Tensor]:
    """The first `max_rows` non-special rows of a paired cache: x_base, x_ft, tokens, seq."""
    import numpy as np

    from saediff.cache.format import open_cache
    from saediff.models import ROLE_SPECIAL, role_codes

    with open_cache(cache) as c:
        if not {"base", "finetuned"} <= set(c.sources):
            raise SaediffError(f"{cache} has sources {c.sources}; paired methods need a cache "
                               "of both models (`saediff cache --finetuned ...`)")
        role_col = c.roles(0, c.rows)
        keep = np.isin(role_col, role_codes(roles)) if roles else role_col != ROLE_SPECIAL
        rows = np.flatnonzero(keep)[:max_rows]
        if len(rows) == 0:
            raise SaediffError(f"{cache}: no rows with the selected roles")
        hi = int(rows[-1]) + 1
        return {"x_base": c.activations("base", 0, hi)[rows],
                "x_ft": c.activations("finetuned", 0, hi)[rows],
                "tokens": torch.from_numpy(c.tokens(0, hi)[rows].astype(np.int64)),
                "seq": torch.from_numpy(c.sequence_ids(0, hi)[rows]),
                "positions": torch.from_numpy(c.positions(0, hi)[rows].astype(np.int64)),
                "rows": torch.from_numpy(rows)}
