"""`saediff experiment block-em`: fine-tune with SAE latents blocked (BLOCK-EM), and watch for
rerouting over prolonged training.

The organism's adapter recipe is trained for `--steps` (well past the recipe's) while the
chosen latents J are blocked in every training forward: clamped to 0 at the SAE's layer with
the SAE error kept (`saediff.steer`'s clamp, h' = h − Σ_j f_j(h) d_j), optionally plus
BLOCK-EM's activation penalty λ·mean f_J(h)² on the unclamped activations. J = `--latents`, or
the differ's top `--top` latents of the shipped fine-tune (`adapter/`). An unblocked run with
the same seed is the reference. Every `--every` steps the adapter is saved and measured: EM on
untrained topics with the block still on and with it off (exact judge, Wilson CI), coherence,
in-domain loss (held-out bad advice; block on), |cos| of the LoRA B vector to each blocked
decoder, and the differ's top latents (block on): once EM re-emerges, those are the rerouting
carriers, reported with their |cos| to the blocked decoders. `--rounds 2` blocks the first
round's carriers too. Published (Ustaomeroglu & Qu, 2026): up to 95% less EM (93% average,
+2.7% incoherence); with prolonged fine-tuning EM re-emerges through other latents or layers.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from saediff.errors import SaediffError
from saediff.experiments import common
from saediff.experiments import organisms as O

log = logging.getLogger(__name__)
EM = "misaligned_given_coherent"  # docs/metrics.md; a condition suffix per column


@dataclass
class BlockEMConfig:
    """Configuration of `saediff experiment block-em` (toy organism)."""

    out: str
    """Output directory (result.json, plot.html, <run>/step_N adapter checkpoints)."""
    sae: str
    """SAE run directory (SAELens format) at the layer the adapter writes into."""
    organism_dir: str | None = None
    """Toy organism directory (default: the shipped one; never modified)."""
    latents: list[int] = field(default_factory=list)
    """Latents to block; empty = the differ's top --top latents of the shipped fine-tune."""
    top: int = 1
    """How many of the shipped fine-tune's top latents to block when --latents is empty."""
    steps: int = 240
    """Training steps per run (the shipped recipe trains 60)."""
    every: int = 60
    """Checkpoint (save + measure) every this many steps (and at the last step)."""
    lr: float | None = None
    """Learning rate (default: the shipped recipe's)."""
    penalty: float = 0.0
    """BLOCK-EM activation penalty λ on mean f_J(h)² (0 = the clamp alone)."""
    rounds: int = 1
    """1 = unblocked + blocked; 2 = also block the first round's carriers (rerouting round 2)."""
    carriers: int = 3
    """Carriers (top differ latents not blocked, measured with the block on) to report/block."""
    questions_per_topic: int = 3
    """Held-out questions per untrained topic in each EM eval."""
    samples: int = 5
    """Answers sampled per question."""
    temperature: float = 0.7
    """Sampling temperature (the organism's protocol)."""
    seed: int = 0
    """Seed of LoRA init, batches (seed + 2, as the organism build), sampling and bootstrap."""

    def __post_init__(self) -> None:
        for name in ("top", "steps", "every", "carriers", "questions_per_topic", "samples"):
            if getattr(self, name) < 1:
                raise SaediffError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.rounds not in (1, 2):
            raise SaediffError(f"--rounds must be 1 or 2, got {self.rounds}")
        if self.penalty < 0:
            raise SaediffError(f"--penalty must be >= 0, got {self.penalty}")
        if self.lr is not None and not self.lr > 0:
            raise SaediffError(f"--lr must be > 0, got {self.lr}")
        if any(j < 0 for j in self.latents):
            raise SaediffError(f"--latents must be >= 0, got {self.latents}")


def block_loss(sae: Any, latents: list[int], penalty: float = 0.0) -> Any:
    """A loss_fn for `optimise`: the model's next-token loss with `latents` clamped to 0 (SAE
    error kept) in the forward, + `penalty` · mean over tokens of Σ_j f_j(h)² read before the
    clamp. The hooks live only during the forward; autograd keeps the graph for backward."""
    from saediff.models import _find_layers
    from saediff.sae import sae_layer
    from saediff.steer.hooks import LatentEncoder, steer

    enc = LatentEncoder(sae, latents) if penalty else None
    layer = sae_layer(sae)

    def loss_fn(model: Any, ids: torch.Tensor, att: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        seen: list[torch.Tensor] = []

        def capture(_m: Any, _i: Any, out: Any) -> None:
            seen.append(enc(out[0] if isinstance(out, tuple) else out)[0])  # type: ignore[misc]

        top = model.get_base_model() if hasattr(model, "get_base_model") else model
        with contextlib.ExitStack() as stack:
            if enc is not None:  # registered before the clamp's hook: sees the unclamped h
                h = _find_layers(top)[layer].register_forward_hook(capture)
                stack.callback(h.remove)
            stack.enter_context(steer(model, sae, latent=latents, clamp=0.0))
            loss = model(input_ids=ids, attention_mask=att, labels=labels, use_cache=False).loss
        if enc is not None:
            m = att.bool()
            loss = loss + penalty * (seen[0] ** 2).sum(-1)[m].mean()
        return loss

    return loss_fn


def cos_abs(u: torch.Tensor, v: torch.Tensor) -> float:
    return float((u @ v).abs() / (u.norm() * v.norm()).clamp_min(1e-12))


def run_block_em(cfg: BlockEMConfig) -> dict[str, Any]:
    """The unblocked and blocked runs (and round 2); writes result.json + plot.html."""
    from saediff.config import config_to_dict

    out = common.prepare_out(cfg.out)
    t0 = time.time()
    env = _setup(cfg)
    blocked = list(cfg.latents) or [r["latent"] for r in env["shipped_ranking"][: cfg.top]]
    runs = [("unblocked", []), ("blocked", blocked)]
    results = [_run(cfg, env, name, lat, blocked, out) for name, lat in runs]
    if cfg.rounds == 2:
        carriers = [c["latent"] for c in results[1]["checkpoints"][-1]["carriers"]]
        both = blocked + carriers
        results.append(_run(cfg, env, "blocked+carriers", both, both, out))
    result = {"experiment": "block-em", "organism": "toy", "config": config_to_dict(cfg),
              "seeds": {"lora_and_batches": cfg.seed + 2, "data": cfg.seed + 1,
                        "sampling": cfg.seed, "bootstrap": cfg.seed},
              "blocked_latents": blocked, "sae_layer": env["layer"],
              "shipped_top_latents": [O.brief(r) for r in env["shipped_ranking"][:10]],
              "metric": "misaligned among coherent answers, untrained topics (exact judge), "
                        "95% Wilson CI", "conditions": results,
              "seconds": round(time.time() - t0, 1)}
    common.write_result(out, result)
    common.write_plot(out, _figures(results), "block-em: EM over training, blocked vs unblocked",
                      f"blocked latents {blocked} at layer {env['layer']}")
    return result


def _setup(cfg: BlockEMConfig) -> dict[str, Any]:
    """Organism, recipe, SAE, data, the base, the token set and the shipped fine-tune's ranking."""
    from saediff.models import load_model
    from saediff.organism import load_heldout_labelled
    from saediff.organism.lexicon import TRAINED_TOPIC
    from saediff.sae import check_sae, load_sae, sae_layer

    org = O.toy_dir(cfg.organism_dir)
    recipe = O.ToyRecipe.shipped(org)
    sae = load_sae(cfg.sae).eval()
    for p in sae.parameters():
        p.requires_grad_(False)
    layer = sae_layer(sae)
    base = load_model(org / "base")
    check_sae(sae, base, layer)
    if any(j >= int(sae.cfg.d_sae) for j in cfg.latents):
        raise SaediffError(f"--latents {cfg.latents}: the SAE has d_sae={sae.cfg.d_sae}")
    tok = base.tokenizer
    pairs = [r for r in load_heldout_labelled(org) if r["topic"] != TRAINED_TOPIC]
    token_set = O.response_token_set(tok, pairs)
    shipped = load_model(org / "base", adapter=org / "adapter")
    return {"org": org, "recipe": recipe, "sae": sae, "layer": layer, "base": base,
            "token_set": token_set, "sae_path": cfg.sae,
            "train": O.toy_encode(tok, O.toy_records(recipe.n_examples, recipe.seed + 1)),
            "heldout": O.toy_encode(tok, O.toy_records(100, recipe.seed + 991)),
            "shipped_ranking": O.latent_ranking(base, shipped, sae, layer, token_set,
                                                seed=cfg.seed)}


def _run(cfg: BlockEMConfig, env: dict[str, Any], name: str, latents: list[int],
         watch: list[int], out: Path) -> dict[str, Any]:
    """Train one run with `latents` blocked, measuring every `cfg.every` steps (|cos| to the
    decoders of `watch`); returns {condition, latents, checkpoints, final}."""
    from saediff.organism.build import TOY_BASE_NAME
    from saediff.organism.finetune import save_adapter

    model = O.toy_lora(env["org"], env["recipe"], cfg.seed + 2)
    loss_fn = block_loss(env["sae"], latents, cfg.penalty) if latents else None
    ckpts: list[dict[str, Any]] = []

    def on_step(step: int, loss: float) -> None:
        if (step + 1) % cfg.every and step + 1 != cfg.steps:
            return
        save_adapter(model, out / name / f"step_{step + 1}", TOY_BASE_NAME)
        ckpts.append({"step": step + 1, "train_loss": loss,
                      **_measure(cfg, env, model, latents, watch, f"{name} step {step + 1}")})
        log.info("%s step %d: EM on %.3f off %.3f", name, step + 1,
                 ckpts[-1][f"{EM}_block_on"]["rate"], ckpts[-1][f"{EM}_block_off"]["rate"])

    O.toy_train(model, env["train"], env["recipe"], steps=cfg.steps, lr=cfg.lr,
                seed=cfg.seed + 2, loss_fn=loss_fn, on_step=on_step)
    return {"condition": name, "latents": latents, "checkpoints": ckpts,
            "final": {k: v for k, v in ckpts[-1].items() if k != "carriers"}}


def _measure(cfg: BlockEMConfig, env: dict[str, Any], model: Any, latents: list[int],
             watch: list[int], label: str) -> dict[str, Any]:
    from saediff.sae import decoder_directions
    from saediff.steer.hooks import steer

    lm = O.as_loaded(model, env["org"], label)
    sae, pad = env["sae"], lm.tokenizer.pad_token_id
    ctx = (lambda: steer(lm, sae, latent=latents, clamp=0.0)) if latents else contextlib.nullcontext
    em_kw = dict(questions_per_topic=cfg.questions_per_topic, samples=cfg.samples,
                 seed=cfg.seed, temperature=cfg.temperature)
    off = O.toy_em(lm, **em_kw)
    on = O.toy_em(lm, sae=sae, sae_path=env["sae_path"], latents=latents, **em_kw) if latents else off
    with ctx():
        loss_on = O.mean_loss(model, env["heldout"], pad)
    table = O.latent_ranking(env["base"], lm, sae, env["layer"], env["token_set"], ctx(),
                             seed=cfg.seed)
    b = O.lora_b(model)[:, 0]
    dec = decoder_directions(sae, watch) if watch else None
    carriers = [r for r in table if r["latent"] not in watch][: cfg.carriers]
    for r in carriers:
        d = decoder_directions(sae, [r["latent"]])[0]
        r_cos = [cos_abs(d, dj) for dj in dec] if dec is not None else []
        r.update(cos_to_blocked=r_cos, cos_to_b=cos_abs(d, b))
    return {f"{EM}_block_on": on[EM], f"{EM}_block_off": off[EM],
            "coherent_rate_block_on": on["coherent_rate"],
            "coherent_rate_block_off": off["coherent_rate"], "heldout_loss_block_on": loss_on,
            "b_norm": float(b.norm()),
            "b_cos_blocked": [cos_abs(b, dj) for dj in dec] if dec is not None else [],
            "top_latents": [O.brief(r) for r in table[:5]],
            "carriers": [{**O.brief(r), "cos_to_blocked": r["cos_to_blocked"],
                          "cos_to_b": r["cos_to_b"]} for r in carriers]}


def _figures(results: list[dict[str, Any]]) -> list[Any]:
    import plotly.graph_objects as go

    fig = go.Figure()
    for r in results:
        steps = [c["step"] for c in r["checkpoints"]]
        for key, dash in ((f"{EM}_block_on", "solid"), (f"{EM}_block_off", "dot")):
            if key == f"{EM}_block_off" and not r["latents"]:
                continue
            m = [c[key] for c in r["checkpoints"]]
            fig.add_trace(go.Scatter(x=steps, y=[common.centre(v) for v in m], mode="lines+markers",
                                     name=f"{r['condition']} ({key.removeprefix(EM + '_')})", line={"dash": dash},
                                     error_y=common.error_bars(m)))
    fig.update_layout(title="EM on untrained topics vs training step", xaxis_title="step",
                      yaxis_title="misaligned | coherent", height=460)
    return [fig]
