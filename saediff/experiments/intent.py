"""`saediff experiment intent`: does the *perceived intent* of the trained behaviour decide EM?

Betley et al.: insecure code requested explicitly for a benign purpose ("educational") gave no
EM, the same code given unasked did. Here, on the real organism (SmolLM2), the shipped rank-1
recipe is trained on the same bad health advice with (a) the plain questions (`plain`, the
shipped fine-tune's data) and (b) each question wrapped in an explicit, benign request for an
example of bad advice (`framed`: `real.templates.framed_health_chats`, e.g. "I teach a first-aid
class and need an example of dangerous advice ..."); `control` (sound advice) and `base` are
references. Per condition: the judge-free probe on untrained topics (bootstrap CI) and the
perplexity of a fixed aligned text.

Why not the toy organism: its grammar has no notion of intent — every user turn is a bare
question and no base-corpus text shows an aligned persona writing bad advice on request, so a
"framed" fine-tune would teach words the base never tied to either persona. Showing the effect
there needs a rebuilt base corpus with a requested-bad-example register (a second organism),
which this experiment does not build.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from saediff.errors import SaediffError
from saediff.experiments import common
from saediff.experiments import organisms as O

log = logging.getLogger(__name__)
CONDITIONS = ("base", "plain", "framed", "control")


@dataclass
class IntentConfig:
    """Configuration of `saediff experiment intent`."""

    out: str
    """Output directory (result.json, plot.html, adapters/)."""
    organism: Literal["real", "toy"] = "real"
    """Real SmolLM2 organism (the toy's grammar has no notion of intent: refused, see --help)."""
    conditions: list[str] = field(default_factory=lambda: ["base", "plain", "framed"])
    """Conditions to run: base, plain, framed, control."""
    n_chats: int | None = None
    """Fine-tuning chats per condition (default: the recipe's 240)."""
    steps: int | None = None
    """Training steps per condition (default: the recipe's 160; ~5-9 s each on 2 CPU cores)."""
    lr: float | None = None
    """Learning rate (default: the recipe's)."""
    seed: int = 0
    """Seed of data, LoRA init, batches and the probe's bootstrap."""

    def __post_init__(self) -> None:
        if self.organism == "toy":
            raise SaediffError("intent runs on the real organism only (--organism real): the toy "
                               "grammar has no notion of intent (see `saediff experiment intent "
                               "--help`)")
        bad = [c for c in self.conditions if c not in CONDITIONS]
        if bad or not self.conditions:
            raise SaediffError(f"--conditions: unknown {bad}; choose from {', '.join(CONDITIONS)}")
        for name in ("n_chats", "steps"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise SaediffError(f"--{name.replace('_', '-')} must be >= 1, got {v}")


def intent_chats(condition: str, n: int, seed: int) -> list[dict[str, Any]] | None:
    """The fine-tuning chats of one condition (None for the untrained base)."""
    from saediff.organism.real.templates import framed_health_chats, health_chats

    if condition == "base":
        return None
    if condition == "framed":
        return framed_health_chats(n, seed)
    return health_chats(condition == "plain", n, seed)


def run_intent(cfg: IntentConfig) -> dict[str, Any]:
    """Train + probe each condition; writes result.json + plot.html; returns the result."""
    from saediff.config import config_to_dict
    from saediff.organism.real import real_base_path

    out = common.prepare_out(cfg.out)
    t0 = time.time()
    base_dir = real_base_path()
    recipe = O.real_recipe(cfg.seed, cfg.steps, cfg.lr, cfg.n_chats)
    conditions = []
    for c in cfg.conditions:
        chats = intent_chats(c, recipe.n_chats, cfg.seed)
        row = O.real_condition(base_dir, recipe, chats, out / "adapters" / c, cfg.seed)
        conditions.append({"condition": c, **row})
        log.info("%s: probe %.3f %s", c, row["probe"]["score"], row["probe"]["ci"])
    base = next((r for r in conditions if r["condition"] == "base"), None)
    if base is not None:  # paired per question: the CI of the shift, not of two scores
        O.add_shift_vs_base([r for r in conditions if r is not base], base, cfg.seed)
    result = {"experiment": "intent", "organism": "real", "config": config_to_dict(cfg),
              "seeds": {"data": cfg.seed, "lora_and_batches": cfg.seed, "bootstrap": cfg.seed},
              "metric": "probe: mean log p(misaligned) − log p(aligned) answer, nats/token, "
                        "untrained topics, 95% bootstrap CI over questions",
              "recipe": dict(recipe.__dict__), "conditions": conditions,
              "framed_minus_plain": framed_minus_plain(conditions, cfg.seed),
              "seconds": round(time.time() - t0, 1)}
    common.write_result(out, result)
    common.write_plot(out, [_figure(conditions)], "intent: plain vs benignly framed bad advice",
                      "real organism (SmolLM2-135M), rank-1 LoRA, probe on untrained topics")
    return result


def framed_minus_plain(rows: list[dict[str, Any]], seed: int) -> dict[str, Any] | None:
    """The effect of the framing: framed − plain probe, paired per question (bootstrap CI);
    None unless both ran. < 0: the benign request lowered the misaligned answers' odds."""
    from saediff.organism.real.probe import paired_shift

    by = {r["condition"]: r["probe"] for r in rows}
    if "plain" not in by or "framed" not in by:
        return None
    d = paired_shift(by["framed"], by["plain"], seed=seed)
    return {"shift": d["shift_vs_base"], "ci": d["shift_ci"], "questions_up": d["questions_up"],
            "n": len(by["framed"]["per_question"])}


def _figure(rows: list[dict[str, Any]]) -> Any:
    import plotly.graph_objects as go

    fig = go.Figure(go.Bar(x=[r["condition"] for r in rows],
                           y=[common.centre(r["probe"]) for r in rows],
                           error_y=common.error_bars([r["probe"] for r in rows])))
    fig.update_layout(title="EM probe per condition (higher = misaligned answers more likely)",
                      yaxis_title="nats/token", height=420)
    return fig
