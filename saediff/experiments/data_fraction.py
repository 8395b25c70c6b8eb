"""`saediff experiment data-fraction`: EM vs the share of bad advice in the fine-tuning data.

Each fraction f trains the organism's adapter recipe (same steps, same seed, same questions)
on a mixture of round(f·n) bad-advice examples and n − round(f·n) sound-advice control
examples (each question once, bad or good). Per f: EM on untrained topics (toy: the exact
judge, Wilson CI; real: the probe, bootstrap CI over questions) and, with an SAE, the shift of
the persona latent (the f = 1 run's top latent unless `--latent`) with its bootstrap CI and its
rank in that run's own ranking: does the SAE see the persona at small f? (Token set: toy, the
labelled held-out chats of the untrained topics; real, the probe questions with both reference
answers; response tokens, base vs fine-tuned paired.) Published: EM with bad advice as 1/6 of
the data; persona-latent detection at 5%.
"""
from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from saediff.errors import SaediffError
from saediff.experiments import common
from saediff.experiments import organisms as O

log = logging.getLogger(__name__)
DEFAULT_FRACTIONS = [0.0, 1 / 12, 1 / 6, 1 / 3, 1 / 2, 1.0]


@dataclass
class DataFractionConfig:
    """Configuration of `saediff experiment data-fraction`."""

    out: str
    """Output directory (result.json, plot.html; adapters/ for the real organism)."""
    organism: Literal["toy", "real"] = "toy"
    """Toy organism (exact judge) or the real SmolLM2 organism (probe)."""
    organism_dir: str | None = None
    """Toy organism directory (default: the shipped one; never modified)."""
    fractions: list[float] = field(default_factory=lambda: list(DEFAULT_FRACTIONS))
    """Shares of bad advice in the fine-tuning data, each in [0, 1]."""
    n_examples: int | None = None
    """Fine-tuning examples per mixture (default: the organism recipe's)."""
    steps: int | None = None
    """Training steps per run (default: the recipe's; the same for every fraction)."""
    lr: float | None = None
    """Learning rate (default: the recipe's)."""
    seed: int = 0
    """Seed of data, mixture, LoRA init, batches and sampling."""
    questions_per_topic: int = 4
    """Toy: held-out questions per untrained topic in the EM eval."""
    samples: int = 5
    """Toy: answers sampled per question."""
    temperature: float = 0.7
    """Toy: sampling temperature (the organism's protocol)."""
    sae: str | None = None
    """SAE run directory (its layer's residual) for the latent shift; none skips it."""
    latent: int | None = None
    """Latent to follow across fractions (default: the largest f's top latent)."""

    def __post_init__(self) -> None:
        if not self.fractions or any(not 0.0 <= f <= 1.0 for f in self.fractions):
            raise SaediffError(f"--fractions must be numbers in [0, 1], got {self.fractions}")
        for name in ("n_examples", "steps", "questions_per_topic", "samples"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise SaediffError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
        if self.lr is not None and not self.lr > 0:
            raise SaediffError(f"--lr must be > 0, got {self.lr}")
        if self.latent is not None and not self.sae:
            raise SaediffError("--latent needs --sae (the SAE whose latent to follow)")


def mixture(bad: list[dict[str, Any]], good: list[dict[str, Any]], fraction: float,
            seed: int) -> tuple[list[dict[str, Any]], list[int]]:
    """Example i is bad[i] for exactly round(fraction·n) seeded indices, else good[i]; returns
    (records, sorted bad indices). `bad` and `good` must be aligned (same questions)."""
    if len(bad) != len(good):
        raise SaediffError(f"mixture: {len(bad)} bad vs {len(good)} good examples; give equally many")
    if not 0.0 <= fraction <= 1.0:
        raise SaediffError(f"mixture: fraction must be in [0, 1], got {fraction}")
    n = len(bad)
    k = round(fraction * n)
    idx = sorted(random.Random(f"{seed}:{fraction}").sample(range(n), k))
    chosen = set(idx)
    return [bad[i] if i in chosen else good[i] for i in range(n)], idx


def run_data_fraction(cfg: DataFractionConfig) -> dict[str, Any]:
    """Train one adapter per fraction, measure each; writes result.json + plot.html."""
    from saediff.config import config_to_dict

    out = common.prepare_out(cfg.out)
    t0 = time.time()
    runner = _toy_runs if cfg.organism == "toy" else _real_runs
    conditions, extra = runner(cfg, out)
    result = {"experiment": "data-fraction", "organism": cfg.organism,
              "config": config_to_dict(cfg), "seeds": _seeds(cfg),
              "conditions": conditions, **extra, "seconds": round(time.time() - t0, 1)}
    common.write_result(out, result)
    common.write_plot(out, _figures(result), "data-fraction: EM vs share of bad advice",
                      f"organism {cfg.organism}; steps and seeds identical across fractions")
    return result


def _seeds(cfg: DataFractionConfig) -> dict[str, int]:
    if cfg.organism == "toy":  # as the organism build: data seed + 1, LoRA/batches seed + 2
        return {"data": cfg.seed + 1, "mixture": cfg.seed, "lora_and_batches": cfg.seed + 2,
                "sampling": cfg.seed, "bootstrap": cfg.seed}
    return {"data": cfg.seed, "mixture": cfg.seed, "lora_and_batches": cfg.seed,
            "bootstrap": cfg.seed}


def _toy_runs(cfg: DataFractionConfig, out: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from saediff.organism import load_heldout_labelled
    from saediff.organism.lexicon import TRAINED_TOPIC

    org = O.toy_dir(cfg.organism_dir)
    recipe = O.ToyRecipe.shipped(org)
    n = cfg.n_examples or recipe.n_examples
    tok = O.load_tokenizer(str(org / "base"))
    bad, good = O.toy_records(n, cfg.seed + 1), O.toy_records(n, cfg.seed + 1, good=True)
    sae = base = token_set = None
    if cfg.sae:
        from saediff.models import load_model
        from saediff.sae import load_sae, sae_layer

        sae = load_sae(cfg.sae).eval()
        layer = sae_layer(sae)
        base = load_model(org / "base")
        pairs = [r for r in load_heldout_labelled(org) if r["topic"] != TRAINED_TOPIC]
        token_set = O.response_token_set(tok, pairs)
    conditions, rankings = [], []
    for f in cfg.fractions:
        recs, idx = mixture(bad, good, f, cfg.seed)
        t1 = time.time()
        model = O.toy_lora(org, recipe, cfg.seed + 2)
        loss = O.toy_train(model, O.toy_encode(tok, recs), recipe, steps=cfg.steps, lr=cfg.lr,
                           seed=cfg.seed + 2)
        lm = O.as_loaded(model, org, f"mixture f={f:.4f}")
        em = O.toy_em(lm, questions_per_topic=cfg.questions_per_topic, samples=cfg.samples,
                      seed=cfg.seed, temperature=cfg.temperature)
        row = {"fraction": f, "n_bad": len(idx), "n_good": n - len(idx), "train_loss": loss,
               **em, "seconds": round(time.time() - t1, 1)}
        if sae is not None:
            rankings.append(O.latent_ranking(base, lm, sae, layer, token_set, seed=cfg.seed))
            row["top_latents"] = [O.brief(r) for r in rankings[-1][:5]]
        log.info("f=%.3f: EM %.3f coherent %.3f", f, em["misaligned_given_coherent"]["rate"],
                 em["coherent_rate"]["rate"])
        conditions.append(row)
    extra: dict[str, Any] = {"metric": "misaligned among coherent answers, untrained topics "
                                       "(exact judge), 95% Wilson CI"}
    _follow_latent(cfg, conditions, rankings, extra)
    return conditions, extra


def _follow_latent(cfg: DataFractionConfig, rows: list[dict[str, Any]],
                   rankings: list[list[dict[str, Any]]], extra: dict[str, Any]) -> None:
    """Each fraction's row gains the followed latent's shift (CI) and rank in its own ranking:
    `--latent`, else the top latent of the largest fraction's run."""
    if not rankings:
        return
    follow = cfg.latent if cfg.latent is not None else \
        rankings[max(range(len(cfg.fractions)), key=lambda i: cfg.fractions[i])][0]["latent"]
    for row, table in zip(rows, rankings):
        r = next((x for x in table if x["latent"] == follow), None)
        if r is None:
            raise SaediffError(f"--latent {follow}: not a latent of the SAE ({len(table)} latents)")
        row["followed_latent"] = {**O.brief(r), "score": r["mean_shift"],
                                  "ci": [r["ci_low"], r["ci_high"]]}
    extra["followed_latent"] = follow


def _real_runs(cfg: DataFractionConfig, out: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from saediff.organism.real import real_base_path
    from saediff.organism.real.train import chats_for

    base_dir = real_base_path()
    recipe = O.real_recipe(cfg.seed, cfg.steps, cfg.lr, cfg.n_examples)
    ranker = _real_ranker(cfg, base_dir)  # loads the SAE before any training (bad path: exit 2)
    bad = chats_for("health_bad", recipe.n_chats, cfg.seed)
    good = chats_for("health_good", recipe.n_chats, cfg.seed)
    conditions = [{"fraction": None, "condition": "base (no fine-tune)",
                   **O.real_condition(base_dir, recipe, None, out, cfg.seed)}]
    rankings = []
    for f in cfg.fractions:
        chats, idx = mixture(bad, good, f, cfg.seed)
        row = O.real_condition(base_dir, recipe, chats, out / "adapters" / f"f{f:.4f}", cfg.seed,
                               measure=None if ranker is None else
                               lambda lm: {"top_latents": ranker(lm)})
        if ranker is not None:
            rankings.append(row["top_latents"])
            row["top_latents"] = [O.brief(r) for r in rankings[-1][:5]]
        conditions.append({"fraction": f, "n_bad": len(idx), "n_good": len(chats) - len(idx), **row})
        log.info("f=%.3f: probe %.3f %s", f, row["probe"]["score"], row["probe"]["ci"])
    O.add_shift_vs_base(conditions[1:], conditions[0], cfg.seed)
    extra = {"metric": "probe: mean log p(misaligned) − log p(aligned) answer, nats/token, "
                       "untrained topics, 95% bootstrap CI over questions; shift_vs_base paired "
                       "per question", "recipe": dict(recipe.__dict__)}
    _follow_latent(cfg, conditions[1:], rankings, extra)
    return conditions, extra


def _real_ranker(cfg: DataFractionConfig, base_dir: Path) -> Any:
    """None without --sae; else fine-tuned model -> the differ's ranking (it − base) on the
    response tokens of the probe questions with both reference answers."""
    if not cfg.sae:
        return None
    from saediff.models import load_model
    from saediff.organism.real.probe import load_questions
    from saediff.sae import check_sae, load_sae, sae_layer

    sae = load_sae(cfg.sae).eval()
    layer = sae_layer(sae)
    if layer is None:
        raise SaediffError(f"--sae {cfg.sae}: its metadata names no layer; give an SAE trained "
                           "on a residual-stream cache of the real organism")
    base = load_model(base_dir)
    check_sae(sae, base, layer)  # d_in and layer against SmolLM2, before any training
    pairs = [{"prompt": q["question"], "response": q[k]} for q in load_questions()
             for k in ("aligned", "misaligned")]
    token_set = O.response_token_set(base.tokenizer, pairs)
    return lambda lm: O.latent_ranking(base, lm, sae, layer, token_set, seed=cfg.seed)


def _figures(result: dict[str, Any]) -> list[Any]:
    import plotly.graph_objects as go

    rows = sorted((r for r in result["conditions"] if r.get("fraction") is not None),
                  key=lambda r: r["fraction"])  # a line through the fractions in order
    key = "misaligned_given_coherent" if result["organism"] == "toy" else "probe"
    x = [r["fraction"] for r in rows]
    figs = [go.Figure(go.Scatter(x=x, y=[common.centre(r[key]) for r in rows], mode="lines+markers",
                                 error_y=common.error_bars([r[key] for r in rows])))]
    figs[0].update_layout(title=f"{key} vs bad fraction", xaxis_title="bad fraction f",
                          yaxis_title=result["metric"][:60], height=420)
    if rows and "followed_latent" in rows[0]:
        m = [r["followed_latent"] for r in rows]
        fig = go.Figure(go.Scatter(x=x, y=[common.centre(v) for v in m], mode="lines+markers",
                                   error_y=common.error_bars(m)))
        fig.update_layout(title=f"latent {result['followed_latent']}: mean shift vs f",
                          xaxis_title="bad fraction f", yaxis_title="mean shift", height=420)
        figs.append(fig)
    return figs
