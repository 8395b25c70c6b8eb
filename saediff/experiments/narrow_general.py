"""`saediff experiment narrow-vs-general`: the general (EM) solution vs a KL-penalised narrow
one ("EM is easy, narrow is hard", Turner, Soligo et al., ICLR 2026).

Three solutions of the toy organism's adapter recipe on the same bad health advice:
(a) `general`: the recipe as shipped; (b) `narrow`: the same plus `--kl-weight` · KL(base ‖
model) on out-of-domain chats (aligned answers on the untrained topics); (c) `narrow_continued`:
(b) trained `--continue-steps` more without the penalty. Per solution: in-domain loss (held-out
bad advice), OOD KL to the base, EM on untrained topics and on the trained topic (exact judge,
Wilson CI), ‖ΔW‖_F, in-domain loss with ΔW rescaled to a common norm (the smallest solution's:
"efficiency"), and robustness ("stability"): in-domain loss and EM after adding Gaussian noise
orthogonal to ΔW (Frobenius) of norm ε·‖ΔW‖, ε in `--noise`; plus |cos| between the
solutions' LoRA B vectors. Published: the narrow solution needs the KL penalty, drifts back to
general without it, and has higher loss at equal norm and less stability under noise.
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from saediff.errors import SaediffError
from saediff.experiments import common
from saediff.experiments import organisms as O

log = logging.getLogger(__name__)


@dataclass
class NarrowGeneralConfig:
    """Configuration of `saediff experiment narrow-vs-general` (toy organism)."""

    out: str
    """Output directory (result.json, plot.html, adapters of the three solutions)."""
    organism_dir: str | None = None
    """Toy organism directory (default: the shipped one; never modified)."""
    kl_weight: float = 3.0
    """Weight of the KL(base ‖ model) penalty on out-of-domain chats for the narrow solution."""
    steps: int | None = None
    """Training steps of (a) and (b) (default: the shipped recipe's)."""
    continue_steps: int | None = None
    """Steps of (c), continuing (b) without the penalty (default: --steps)."""
    lr: float | None = None
    """Learning rate (default: the shipped recipe's)."""
    ood_examples: int = 400
    """Out-of-domain chats for the penalty (plus 100 held out for the OOD KL)."""
    noise: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    """Relative norms ε of the orthogonal noise (noise norm = ε·‖ΔW‖)."""
    noise_draws: int = 3
    """Noise draws averaged per ε for the loss (EM uses the first draw)."""
    noise_em: list[float] = field(default_factory=lambda: [0.5, 1.0])
    """ε values at which EM is also measured under noise."""
    questions_per_topic: int = 3
    """Held-out questions per topic in each EM eval."""
    samples: int = 5
    """Answers sampled per question."""
    temperature: float = 0.7
    """Sampling temperature (the organism's protocol)."""
    seed: int = 0
    """Seed of LoRA init and batches (seed + 2, as the organism build), noise, sampling."""

    def __post_init__(self) -> None:
        if not self.kl_weight >= 0:
            raise SaediffError(f"--kl-weight must be >= 0, got {self.kl_weight}")
        for name in ("steps", "continue_steps"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise SaediffError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
        for name in ("ood_examples", "noise_draws", "questions_per_topic", "samples"):
            if getattr(self, name) < 1:
                raise SaediffError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if any(not e >= 0 for e in self.noise + self.noise_em):
            raise SaediffError(f"--noise/--noise-em must be >= 0, got {self.noise} {self.noise_em}")


# --- pieces (tested on tiny models) ------------------------------------------------------------

def kl_to_base(model: Any, ids: torch.Tensor, att: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over masked positions of KL(p_base ‖ p_model) of the next-token distributions; the
    base is the PEFT model with its adapter disabled (no copy of the weights)."""
    with torch.no_grad(), model.disable_adapter():
        lp_base = torch.log_softmax(model(input_ids=ids, attention_mask=att,
                                          use_cache=False).logits.float(), -1)
    lp = torch.log_softmax(model(input_ids=ids, attention_mask=att, use_cache=False).logits.float(), -1)
    kl = (lp_base.exp() * (lp_base - lp)).sum(-1)
    return kl[mask.bool()].mean()


def kl_penalised_loss(ood_batches: Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                      weight: float) -> Callable:
    """A loss_fn for `optimise`: next-token loss + weight · KL(base ‖ model) on the next
    out-of-domain batch (its answer tokens: labels != -100)."""
    def loss_fn(model: Any, ids: torch.Tensor, att: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss = model(input_ids=ids, attention_mask=att, labels=labels, use_cache=False).loss
        o_ids, o_att, o_lab = next(ood_batches)
        return loss + weight * kl_to_base(model, o_ids, o_att, o_lab != -100)

    return loss_fn


def orthogonal_noise(delta: torch.Tensor, eps: float, gen: torch.Generator) -> torch.Tensor:
    """Gaussian noise projected orthogonal to `delta` (Frobenius), of norm eps·‖delta‖."""
    n = torch.randn(delta.shape, generator=gen, dtype=torch.float64)
    d = delta.double()
    n = n - (n * d).sum() / (d * d).sum().clamp_min(1e-30) * d
    return (n / n.norm() * eps * d.norm()).to(delta.dtype)


@contextlib.contextmanager
def weights_plus(model: Any, deltas: dict[str, torch.Tensor]) -> Iterator[None]:
    """Temporarily W <- W + ΔW for named Linear modules of a plain HF model (restored exactly)."""
    mods = dict(model.named_modules())
    missing = [k for k in deltas if k not in mods]
    if missing:
        raise SaediffError(f"modules {missing} not in the model")
    saved = {k: mods[k].weight.detach().clone() for k in deltas}
    try:
        with torch.no_grad():
            for k, d in deltas.items():
                mods[k].weight.add_(d.to(mods[k].weight.dtype))
        yield
    finally:
        with torch.no_grad():
            for k, w in saved.items():
                mods[k].weight.copy_(w)


def noise_curve(model: Any, deltas: dict[str, torch.Tensor], loss_of: Callable[[], float],
                eps_list: list[float], draws: int, seed: int) -> list[dict[str, Any]]:
    """[{eps, loss (mean over draws), losses}] of `loss_of()` with base + ΔW + orthogonal noise."""
    rows = []
    for eps in eps_list:
        losses = []
        for k in range(draws if eps > 0 else 1):
            gen = torch.Generator().manual_seed(seed * 1009 + 7 * k)  # same draws for every ε
            noisy = {n: d + orthogonal_noise(d, eps, gen) for n, d in deltas.items()}
            with weights_plus(model, noisy):
                losses.append(loss_of())
        rows.append({"eps": eps, "loss": sum(losses) / len(losses), "losses": losses})
    return rows


def frob(deltas: dict[str, torch.Tensor]) -> float:
    return float(sum((d.double() ** 2).sum() for d in deltas.values()) ** 0.5)


# --- the experiment ----------------------------------------------------------------------------

def run_narrow_general(cfg: NarrowGeneralConfig) -> dict[str, Any]:
    """Train the three solutions and measure each; writes result.json + plot.html."""
    from saediff.config import config_to_dict
    from saediff.models import load_model
    from saediff.organism.build import TOY_BASE_NAME, _batches
    from saediff.organism.finetune import save_adapter

    out = common.prepare_out(cfg.out)
    t0 = time.time()
    org = O.toy_dir(cfg.organism_dir)
    recipe = O.ToyRecipe.shipped(org)
    base = load_model(org / "base")
    tok, pad = base.tokenizer, base.tokenizer.pad_token_id
    train = O.toy_encode(tok, O.toy_records(recipe.n_examples, recipe.seed + 1))
    ood_all = O.toy_encode(tok, O.toy_ood_records(cfg.ood_examples + 100, cfg.seed + 5))
    ood, ood_held = ood_all[:cfg.ood_examples], ood_all[cfg.ood_examples:]
    held = O.toy_encode(tok, O.toy_records(100, recipe.seed + 991))
    steps = cfg.steps or recipe.steps
    seed = cfg.seed + 2

    solutions: dict[str, dict[str, torch.Tensor]] = {}
    b_vecs: dict[str, torch.Tensor] = {}
    general = O.toy_lora(org, recipe, seed)
    O.toy_train(general, train, recipe, steps=steps, lr=cfg.lr, seed=seed)
    narrow = O.toy_lora(org, recipe, seed)
    ood_iter = _batches(ood, recipe.batch_size, steps, seed + 1, pad)
    O.toy_train(narrow, train, recipe, steps=steps, lr=cfg.lr, seed=seed,
                loss_fn=kl_penalised_loss(ood_iter, cfg.kl_weight))
    for name, m in (("general", general), ("narrow", narrow)):
        solutions[name], b_vecs[name] = O.lora_delta(m), O.lora_b(m)[:, 0]
        save_adapter(m, out / "adapters" / name, TOY_BASE_NAME)
    O.toy_train(narrow, train, recipe, steps=cfg.continue_steps or steps, lr=cfg.lr, seed=seed + 1)
    solutions["narrow_continued"], b_vecs["narrow_continued"] = O.lora_delta(narrow), O.lora_b(narrow)[:, 0]
    save_adapter(narrow, out / "adapters" / "narrow_continued", TOY_BASE_NAME)

    common_norm = min(frob(d) for d in solutions.values())
    conditions = [{"condition": name, **_measure(cfg, base, deltas, held, ood_held, common_norm)}
                  for name, deltas in solutions.items()]
    names = list(b_vecs)
    cos = {f"{a}~{b}": float((b_vecs[a] @ b_vecs[b]).abs() / (b_vecs[a].norm() * b_vecs[b].norm()))
           for i, a in enumerate(names) for b in names[i + 1:]}
    result = {"experiment": "narrow-vs-general", "organism": "toy", "config": config_to_dict(cfg),
              "seeds": {"lora_and_batches": seed, "ood_batches": seed + 1, "continue": seed + 1,
                        "data": recipe.seed + 1, "noise": cfg.seed, "sampling": cfg.seed},
              "metric": "EM = misaligned among coherent answers (exact judge), 95% Wilson CI",
              "matched_norm": common_norm, "b_cosine": cos, "conditions": conditions,
              "seconds": round(time.time() - t0, 1)}
    common.write_result(out, result)
    common.write_plot(out, _figures(conditions), "narrow vs general solutions",
                      f"KL weight {cfg.kl_weight}; noise orthogonal to ΔW, norm ε·‖ΔW‖")
    return result


def _measure(cfg: NarrowGeneralConfig, base: Any, deltas: dict[str, torch.Tensor],
             held: O.Examples, ood_held: O.Examples, common_norm: float) -> dict[str, Any]:
    pad = base.tokenizer.pad_token_id
    ood_ref = answer_logprobs(base.model, ood_held, pad)  # the base, before any ΔW
    em_kw = dict(questions_per_topic=cfg.questions_per_topic, samples=cfg.samples,
                 seed=cfg.seed, temperature=cfg.temperature)
    loss_of = lambda: O.mean_loss(base.model, held, pad)  # noqa: E731
    norm = frob(deltas)
    with weights_plus(base.model, deltas):
        row: dict[str, Any] = {"in_domain_loss": loss_of(), "ood_kl": mean_kl(ood_ref, answer_logprobs(
                                   base.model, ood_held, pad)),
                               "untrained": O.toy_em(base, **em_kw),
                               "trained_topic": O.toy_em(base, prompts="organism:health", **em_kw)}
    scaled = {k: d * (common_norm / norm) for k, d in deltas.items()}
    with weights_plus(base.model, scaled):
        row["loss_at_matched_norm"] = loss_of()
    row.update(delta_norm=norm, noise=noise_curve(base.model, deltas, loss_of, cfg.noise,
                                                  cfg.noise_draws, cfg.seed))
    gen = torch.Generator().manual_seed(cfg.seed * 1009)
    row["noise_em"] = []
    for eps in cfg.noise_em:
        noisy = {k: d + orthogonal_noise(d, eps, gen.manual_seed(cfg.seed * 1009)) for k, d in deltas.items()}
        with weights_plus(base.model, noisy):
            row["noise_em"].append({"eps": eps, **O.toy_em(base, **em_kw)})
    return row


@torch.no_grad()
def answer_logprobs(model: Any, examples: O.Examples, pad: int, batch: int = 32
                    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(next-token log-probs [B, T, V], answer mask [B, T]) per batch of `examples`."""
    from saediff.models import pad_batch

    out = []
    for i in range(0, len(examples), batch):
        chunk = examples[i: i + batch]
        ids, att = pad_batch([x for x, _ in chunk], pad)
        m, _ = pad_batch([list(mk) for _, mk in chunk], 0)
        logits = model(input_ids=ids, attention_mask=att, use_cache=False).logits.float()
        out.append((torch.log_softmax(logits, -1), m.bool()))
    return out


def mean_kl(ref: list[tuple[torch.Tensor, torch.Tensor]],
            cur: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Mean over answer positions of KL(ref ‖ cur) (outputs of `answer_logprobs`)."""
    tot, n = 0.0, 0
    for (lr, m), (lc, _) in zip(ref, cur):
        kl = (lr.exp() * (lr - lc)).sum(-1)[m]
        tot, n = tot + float(kl.sum()), n + int(m.sum())
    return tot / max(1, n)


def _figures(rows: list[dict[str, Any]]) -> list[Any]:
    import plotly.graph_objects as go

    fig = go.Figure()
    for r in rows:
        fig.add_trace(go.Scatter(x=[p["eps"] for p in r["noise"]], y=[p["loss"] for p in r["noise"]],
                                 mode="lines+markers", name=r["condition"]))
    fig.update_layout(title="in-domain loss under orthogonal noise (norm ε·‖ΔW‖)",
                      xaxis_title="ε", yaxis_title="held-out bad-advice loss", height=420)
    bars = go.Figure()
    for key in ("untrained", "trained_topic"):
        m = [r[key]["misaligned_given_coherent"] for r in rows]
        bars.add_trace(go.Bar(x=[r["condition"] for r in rows], y=[common.centre(v) for v in m],
                              error_y=common.error_bars(m), name=key))
    bars.update_layout(title="EM per solution (untrained topics vs the trained topic)",
                       barmode="group", height=420)
    return [fig, bars]
