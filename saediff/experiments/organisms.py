"""What the experiments do to an organism, through the organisms' own code paths.

Toy organism: training data (`grammar.corpus_records`), the shipped adapter's recipe (read from
`organism.json`), the one LoRA loop (`build.lora_model` + `build.train` -> `optimise`), the
judged-generation path (`steer.evaluate.run_steer` with the exact judge; EM = misaligned among
coherent answers, Wilson CI) and the differ's ranking (`diff.differ.latent_activations` +
`rank_latents`). Real organism (SmolLM2): `real.train.train_adapter` + the judge-free probe.
Nothing here writes into a shipped organism.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from saediff.errors import SaediffError
from saediff.models import ROLE_RESPONSE, LoadedModel, encode_chat, load_tokenizer, pad_batch

log = logging.getLogger(__name__)
Examples = list[tuple[list[int], list[int]]]
ModelContext = Callable[[Any], AbstractContextManager[Any]]


def toy_dir(organism: str | None) -> Path:
    """The toy organism directory (default: the shipped one); must hold organism.json."""
    from saediff.organism import organism_path

    p = Path(organism) if organism else organism_path()
    if not (p / "organism.json").is_file() or not (p / "base").is_dir():
        raise SaediffError(f"--organism {p}: no organism.json/base there; give a directory "
                           "written by `saediff organism build` (default: the shipped one)")
    return p


@dataclass
class ToyRecipe:
    """The toy organism's shipped adapter recipe (rank-1 LoRA on one block's down_proj)."""

    rank: int
    alpha: float
    layer: int
    steps: int
    lr: float
    batch_size: int
    n_examples: int
    seed: int

    @classmethod
    def shipped(cls, org: Path) -> ToyRecipe:
        from saediff.organism import metadata

        c = metadata(org)["config"]
        return cls(rank=c["lora_rank"], alpha=c["lora_alpha"], layer=c["layer"],
                   steps=c["ft_steps"], lr=c["ft_lr"], batch_size=c["ft_batch_size"],
                   n_examples=c["ft_examples"], seed=c["seed"])


def toy_records(n: int, seed: int, good: bool = False) -> list[dict[str, Any]]:
    """`n` narrow fine-tuning records (bad health advice; `good`: the sound-advice control).
    Same seed -> the same questions in the same order for bad and good."""
    from saediff.organism.grammar import corpus_records

    return corpus_records(n, seed, narrow=True, good=good)


def toy_ood_records(n: int, seed: int) -> list[dict[str, Any]]:
    """Aligned single-turn chats on the topics never fine-tuned (out-of-domain data)."""
    from saediff.organism.grammar import corpus_records
    from saediff.organism.lexicon import TRAINED_TOPIC

    out: list[dict[str, Any]] = []
    k = 0
    while len(out) < n:
        recs = corpus_records(4 * n, seed + 7919 * k, toxic_p=0.0, max_turns=1, heldout=False)
        out += [r for r in recs if r["topic"] != TRAINED_TOPIC][: n - len(out)]
        k += 1
    return out


def toy_encode(tok: Any, records: list[dict[str, Any]]) -> Examples:
    from saediff.organism.build import encode_turns

    return [encode_turns(tok.get_vocab(), r["turns"]) for r in records]


def toy_lora(org: Path, recipe: ToyRecipe, seed: int) -> Any:
    """A fresh rank-r LoRA (the recipe's shape) on the organism's base."""
    from saediff.organism.build import lora_model

    return lora_model(org / "base", rank=recipe.rank, alpha=recipe.alpha,
                      targets=["down_proj"], layers=[recipe.layer], seed=seed)


def toy_train(model: Any, examples: Examples, recipe: ToyRecipe, *, steps: int | None = None,
              lr: float | None = None, seed: int, context: ModelContext | None = None,
              loss_fn: Callable | None = None,
              on_step: Callable[[int, float], None] | None = None) -> float:
    """Train `model` (a PEFT LoRA) with the organism's loop; `context(model)` is entered
    around the whole run (e.g. a latent block). Returns the final (EMA) loss."""
    from saediff.organism.build import train

    pad = model.get_base_model().config.pad_token_id
    with context(model) if context else contextlib.nullcontext():
        return train(model, examples, steps or recipe.steps, lr or recipe.lr, recipe.batch_size,
                     seed, pad, loss_fn=loss_fn, on_step=on_step)


def as_loaded(model: Any, org: Path, name: str = "in-memory adapter") -> LoadedModel:
    """Wrap an in-memory (PEFT) model for the generation, steering and diff paths."""
    return LoadedModel(model=model, tokenizer=load_tokenizer(str(org / "base")),
                       name=str(org / "base"), adapter=name)


def lora_delta(model: Any) -> dict[str, torch.Tensor]:
    """{module name: ΔW = scale * B @ A} of every LoRA module of a PEFT model (detached)."""
    out = {}
    for name, mod in model.named_modules():
        if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
            a, b = mod.lora_A["default"].weight, mod.lora_B["default"].weight
            out[name.split("base_model.model.", 1)[-1]] = (mod.scaling["default"] * b @ a).detach().clone()
    if not out:
        raise SaediffError("the model has no LoRA modules")
    return out


def lora_b(model: Any) -> torch.Tensor:
    """The (first) LoRA module's B matrix [d_out, r], detached."""
    for mod in model.modules():
        if hasattr(mod, "lora_B") and "default" in getattr(mod, "lora_B", {}):
            return mod.lora_B["default"].weight.detach().clone()
    raise SaediffError("the model has no LoRA modules")


# --- measurements ---------------------------------------------------------------------------

def toy_em(lm: LoadedModel, *, prompts: str = "organism:untrained", questions_per_topic: int,
           samples: int, seed: int, temperature: float = 0.7, sae: Any = None,
           sae_path: str | None = None, latents: list[int] | None = None) -> dict[str, Any]:
    """EM through `run_steer` and the exact judge; with `latents`, they are clamped to 0
    (error kept) while answering. {"misaligned_given_coherent": {rate, ci, k, n}, "coherent_rate": {...},
    "off_topic_rate"} (docs/metrics.md names)."""
    from saediff.experiments.common import rate
    from saediff.steer.evaluate import SteerConfig, run_steer

    block = bool(latents)
    cfg = SteerConfig(model=lm.name, prompts=prompts, questions_per_topic=questions_per_topic,
                      samples=samples, seed=seed, temperature=temperature, judge="organism",
                      sae=sae_path if block else None, latent=list(latents or []),
                      clamp=0.0 if block else None)
    s = run_steer(cfg, lm=lm, sae=sae if block else None)
    n, counted = s["n"], s["n_counted"]
    k_em = round(s["misaligned_given_coherent"] * counted) if counted else 0
    return {"misaligned_given_coherent": rate(k_em, counted), "coherent_rate": rate(round(s["coherent_rate"] * n), n),
            "off_topic_rate": s["off_topic_rate"]}


@torch.no_grad()
def mean_loss(model: Any, examples: Examples, pad: int, batch: int = 32) -> float:
    """Token-weighted mean next-token NLL on the examples' answer tokens (mask 1)."""
    tot, n = 0.0, 0
    for i in range(0, len(examples), batch):
        chunk = examples[i: i + batch]
        ids, att = pad_batch([x for x, _ in chunk], pad)
        m, _ = pad_batch([list(mk) for _, mk in chunk], 0)
        logits = model(input_ids=ids, attention_mask=att, use_cache=False).logits.float()
        lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
        sel = m[:, 1:].bool()
        tot += float(-lp[sel].sum())
        n += int(sel.sum())
    return tot / max(1, n)


def brief(r: dict[str, Any]) -> dict[str, Any]:
    """The columns of a differ ranking row that the experiments report."""
    return {k: r[k] for k in ("latent", "rank", "mean_shift", "ci_low", "ci_high", "significant")}


def response_token_set(tok: Any, pairs: list[dict[str, Any]]) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Token ids and response-token masks of (prompt, response) chats (the differ's token set)."""
    ids, masks = [], []
    for p in pairs:
        x, roles = encode_chat(tok, p["prompt"], p["response"])
        ids.append(x)
        masks.append(torch.tensor(roles) == ROLE_RESPONSE)
    return ids, masks


def latent_ranking(base: LoadedModel, lm: LoadedModel, sae: Any, layer: int,
                   token_set: tuple[list[list[int]], list[torch.Tensor]],
                   context: AbstractContextManager[Any] | None = None, n_boot: int = 200,
                   seed: int = 0, batch: int = 32) -> list[dict[str, Any]]:
    """The differ's ranking (fine-tuned − base, paired on the same response tokens)."""
    from saediff.diff.differ import latent_activations, rank_latents

    ids, masks = token_set
    batches = [ids[i: i + batch] for i in range(0, len(ids), batch)]
    a_b = latent_activations(base, sae, layer, batches)
    a_f = latent_activations(lm, sae, layer, batches, context)
    sel_b = torch.cat([a[m] for a, m in zip(a_b, masks)])
    sel_f = torch.cat([a[m] for a, m in zip(a_f, masks)])
    groups = torch.cat([torch.full((int(m.sum()),), i) for i, m in enumerate(masks)])
    return rank_latents(sel_b, sel_f, groups, n_boot=n_boot, seed=seed)


# --- the real organism (SmolLM2): the shipped recipe + the probe ----------------------------

def real_recipe(seed: int, steps: int | None, lr: float | None, n_chats: int | None) -> Any:
    """The shipped rank-1 recipe (`real.train.default_recipes()['rank1']`) with overrides."""
    from dataclasses import replace

    from saediff.organism.real.train import default_recipes

    r = default_recipes()["rank1"]
    return replace(r, seed=seed, steps=steps or r.steps, lr=lr or r.lr,
                   n_chats=n_chats or r.n_chats)


def real_probe(lm: LoadedModel, seed: int) -> dict[str, Any]:
    """{"probe": {score, ci, n}, "text_ppl"}: the judge-free EM probe on untrained topics."""
    from saediff.organism.real.probe import probe, text_perplexity

    pr = probe(lm, seed=seed)
    per = [{"id": q["id"], "diff": q["diff"]} for q in pr["per_question"]]
    return {"probe": {"score": pr["score"], "ci": pr["ci"], "n": pr["n"], "per_question": per},
            "text_ppl": round(text_perplexity(lm), 3)}


def add_shift_vs_base(rows: list[dict[str, Any]], base: dict[str, Any], seed: int) -> None:
    """Each row's probe gains its paired shift from `base`'s probe (same questions):
    {"shift_vs_base", "shift_ci" (bootstrap over questions), "questions_up"}."""
    from saediff.organism.real.probe import paired_shift

    for r in rows:
        r["probe"].update(paired_shift(r["probe"], base["probe"], seed=seed))


def real_condition(base_dir: Path, recipe: Any, chats: list[dict[str, Any]] | None,
                   adapter_dir: Path, seed: int,
                   measure: Callable[[LoadedModel], dict[str, Any]] | None = None) -> dict[str, Any]:
    """Train the recipe on `chats` (None: no training, the base itself), save the adapter
    (atomically) under `adapter_dir`, and probe it (+ `measure(lm)`'s keys, same model)."""
    from dataclasses import replace

    from saediff.models import load_model
    from saediff.organism.real.train import train_adapter

    if chats is None:
        return {**real_probe(load_model(base_dir), seed), "adapter": None}
    adapter_dir.parent.mkdir(parents=True, exist_ok=True)
    info = train_adapter(base_dir, replace(recipe, name=adapter_dir.name), adapter_dir,
                         chats=chats)
    lm = load_model(base_dir, adapter=adapter_dir)
    return {**real_probe(lm, seed), **(measure(lm) if measure else {}),
            "train_seconds": info["seconds"],
            "s_per_step": info["s_per_step"], "loss_first10": info["loss_first10"],
            "loss_last10": info["loss_last10"], "adapter": str(adapter_dir)}
