"""The measurement loop of `saediff experiment icl` (see `icl.py` for what it answers)."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch

import saediff.diff.directions as dirs
from saediff.experiments import icl_measure as M
from saediff.experiments.icl_data import check_known_words, eval_items, pool_pairs, shot_histories, system_texts

log = logging.getLogger(__name__)
Ctx = Callable[[Any], AbstractContextManager[Any]] | None


def _models(cfg: Any) -> tuple[Any, Any, Any, int]:
    from saediff.models import check_same_tokenizer, load_model
    from saediff.sae import check_sae, load_sae, resolve_layer

    base = load_model(cfg.base, device=cfg.device)
    ft = load_model(cfg.finetuned or cfg.base, None if cfg.finetuned else cfg.adapter,
                    device=cfg.device)
    check_same_tokenizer(base, ft)
    sae = load_sae(cfg.sae, cfg.device).eval() if cfg.sae else None
    layer = cfg.layer
    if sae is not None:
        layer = resolve_layer(sae, layer)
        check_sae(sae, base, layer)
    elif layer is None:
        from saediff.organism import metadata, organism_path

        if Path(cfg.base).resolve() != (organism_path() / "base").resolve():
            from saediff.errors import SaediffError

            raise SaediffError("no --sae and no --layer: give the layer to measure")
        layer = int(metadata()["recommended_layer"])  # the shipped organism's own
    base.check_layer(layer)
    return base, ft, sae, layer


def _fitting_ks(lm: Any, tok: Any, items: list[dict], mis: list, ks: list[int],
                systems: dict[str, str | None]) -> tuple[list[int], dict[int, int], list[dict]]:
    """ks whose longest context fits the model's positions; the longest context per k."""
    n_pos = lm.max_positions
    longest = {}
    for k in ks:
        enc = [M.encode_questions(tok, items, [h[:k] for h in mis], s) for s in systems.values()]
        longest[k] = max(max(e.n_tokens()) for e in enc)
    keep = [k for k in ks if n_pos is None or longest[k] <= n_pos]
    skipped = [{"k": k, "tokens": longest[k], "positions": n_pos} for k in ks if k not in keep]
    for s in skipped:
        log.warning("k=%d skipped: its longest context has %d tokens, the model %d positions",
                    s["k"], s["tokens"], s["positions"])
    return keep, longest, skipped


def _persona_rows(cfg: Any, items: list[dict], pairs: list[dict]) -> list[tuple[str, str, int]]:
    """(prompt, answer, 1 misaligned / 0 aligned) for the persona mean difference."""
    if cfg.prompts.startswith("organism"):
        from saediff.organism import load_heldout_labelled

        return [(r["prompt"], r["response"], int(r["persona"] == "toxic"))
                for r in load_heldout_labelled()]
    if cfg.prompts == "real":
        return [(q["question"], q[f], int(f == "misaligned")) for q in items
                for f in ("misaligned", "aligned")]
    return [(p["prompt"], p[f], int(f == "misaligned")) for p in pairs[:64]
            for f in ("misaligned", "aligned")]


def references(cfg: Any, base: Any, ft: Any, sae: Any, layer: int, items: list[dict],
               pairs: list[dict]) -> dict[str, Any]:
    """The fine-tune's directions and latents, measured without shots or system prompt."""
    tok = base.tokenizer
    enc0 = M.encode_questions(tok, items, [[] for _ in items], None)
    b0 = M.measure(base, sae, layer, enc0, batch_size=cfg.batch_size)
    f0 = M.measure(ft, sae, layer, enc0, batch_size=cfg.batch_size)
    targets: dict[str, torch.Tensor] = {}
    ad = cfg.lora_adapter or cfg.adapter
    if ad:
        for d in dirs.lora_b_vectors(ad, layer, base.d_model)[:1]:
            targets["lora_b"] = d.vector
    targets["finetuned_minus_base"] = (f0.mean() - b0.mean()).float()
    rows = _persona_rows(cfg, items, pairs)
    pos = M.measure(base, None, layer, M.encode_answers(tok, [(p, a) for p, a, y in rows if y]),
                    batch_size=cfg.batch_size)
    neg = M.measure(base, None, layer, M.encode_answers(tok, [(p, a) for p, a, y in rows if not y]),
                    batch_size=cfg.batch_size)
    targets["persona_mean_diff"] = (pos.mean() - neg.mean()).float()
    ft_top = M.ranked(b0, f0, cfg.n_boot, cfg.ci_level, cfg.seed, cfg.top_k)
    ft_up = M.ranked(b0, f0, cfg.n_boot, cfg.ci_level, cfg.seed, 1, direction="up")
    if sae is not None:
        from saediff.sae import decoder_directions

        for r in ft_top[:3]:
            targets[f"decoder latent {r['latent']}"] = decoder_directions(sae, [r["latent"]])[0].float().cpu()
    u = targets.get("lora_b", targets["finetuned_minus_base"])
    names = list(targets)
    cos = dirs.cosine_matrix([targets[n] for n in names])
    return {"targets": targets, "direction": u,
            "direction_name": "lora_b" if "lora_b" in targets else "finetuned_minus_base",
            "finetune_top": ft_top, "clamp_latent": ft_up[0]["latent"] if ft_up else None,
            "reference_cosines": {"names": names,
                                  "cosines": [[round(float(x), 4) for x in r] for r in cos]}}


def conditions(cfg: Any, base: Any, ft: Any, sae: Any, layer: int,
               ref: dict[str, Any]) -> list[tuple[str, Any, Ctx]]:
    """(name, model, steering context) of every model condition measured."""
    from saediff.steer.hooks import steer

    out: list[tuple[str, Any, Ctx]] = [("base", base, None), ("finetuned", ft, None)]
    if cfg.reroute:
        u = ref["direction"].float()
        out.append(("finetuned_ablated", ft, lambda lm: steer(lm, ablate=u, layer=layer)))
        j = ref["clamp_latent"]
        if sae is not None and j is not None:
            out.append(("finetuned_clamped", ft,
                        lambda lm: steer(lm, sae, latent=j, clamp=0.0, layer=layer)))
    return out


def behaviour(cfg: Any, lm: Any, items: list[dict], hists: list[list], system: str | None,
              ctx: Ctx) -> dict[str, Any] | None:
    """Judged EM rate (Wilson CI) or probe score (bootstrap CI) with these shots."""
    import contextlib

    if cfg.behaviour == "none":
        return None
    if cfg.behaviour == "probe":
        from saediff.organism.real.probe import probe

        with ctx(lm) if ctx else contextlib.nullcontext():
            p = probe(lm, items, cfg.n_boot, cfg.seed, system, hists)
        return {"value": p["score"], "ci": p["ci"], "n": p["n"], "kind": "probe"}
    from saediff.judged import GenerationConfig, judged_generation
    from saediff.judges import make_judge

    gen = GenerationConfig(samples=cfg.samples, max_new_tokens=cfg.max_new_tokens,
                           temperature=cfg.temperature, seed=cfg.seed)
    run = judged_generation(lm, [{**it, "history": h} for it, h in zip(items, hists)], gen,
                            make_judge("organism"), ctx(lm) if ctx else None, system=system)
    s, recs = run.summary, run.records
    return {"value": s.misaligned_given_coherent, "ci": s.misaligned_given_coherent_ci,
            "coherent_rate": s.coherent_rate, "off_topic_rate": s.off_topic_rate,
            "misaligned_of_all": s.misaligned_of_all, "n": s.n, "kind": "misaligned_given_coherent",
            "examples": [r["answer"] for r in recs[:: max(1, len(recs) // 3)]][:3]}


def one_k(cfg: Any, lm: Any, sae: Any, layer: int, items: list[dict], mis: list, al: list,
          k: int, system: str | None, ctx: Ctx, ref: dict[str, Any], aligned_behaviour: bool
          ) -> dict[str, Any]:
    """Every measurement of one model condition at k shots."""
    tok, args = lm.tokenizer, (cfg.n_boot, cfg.ci_level, cfg.seed)
    hm, ha = [h[:k] for h in mis], [h[:k] for h in al]
    e_m = M.encode_questions(tok, items, hm, system)
    e_a = M.encode_questions(tok, items, ha, system) if k else e_m
    M.check_paired(e_m, e_a)
    m = M.measure(lm, sae, layer, e_m, ctx, cfg.batch_size)
    a = M.measure(lm, sae, layer, e_a, ctx, cfg.batch_size) if k else m
    row: dict[str, Any] = {"k": k, "context_tokens_mean": sum(e_m.n_tokens()) / len(items),
                           "projection_misaligned": M.projection(m, ref["direction"], *args),
                           "projection_aligned": M.projection(a, ref["direction"], *args)}
    if k:
        diff = m.sums - a.sums  # paired per question: same measured tokens
        row["icl_norm"] = round(float((diff.sum(0) / m.counts.sum()).norm()), 4)
        row["icl_cosines"] = M.cosines_ci(diff, m.counts, ref["targets"], *args)
        top = M.ranked(a, m, *args, cfg.top_k)
        if top:
            row["icl_top_latents"] = top
            row["overlap_with_finetune"] = M.overlap(top, ref["finetune_top"])
    row["behaviour_misaligned"] = behaviour(cfg, lm, items, hm, system, ctx)
    if aligned_behaviour and k:
        row["behaviour_aligned"] = behaviour(cfg, lm, items, ha, system, ctx)
    return row


def _value(row: dict[str, Any], key: str) -> float | None:
    v = row.get(key)
    if v is None:
        return None
    return v.get("mean", v.get("value"))


def reach(dose: dict[str, list[dict[str, Any]]], ks: list[int]) -> dict[str, Any]:
    """k at which the base (misaligned shots) reaches the unprompted fine-tune (k = 0)."""
    out = {}
    for key in ("projection_misaligned", "behaviour_misaligned"):
        target = _value(dose["finetuned"][0], key) if dose["finetuned"][0]["k"] == 0 else None
        values = [_value(r, key) for r in dose["base"]]
        k = M.k_reached(ks, values, target)
        out[key.split("_")[0]] = {"finetuned_unprompted": target, "base": values, "k": k,
                                  "reached": k is not None}
    return out


def execute(cfg: Any) -> dict[str, Any]:
    """Load, build the shots, measure every condition; the result dict (no files)."""
    from saediff.errors import SaediffError

    t0 = time.time()
    items = eval_items(cfg.prompts, cfg.questions_per_topic, cfg.seed, cfg.max_prompts)
    pairs = pool_pairs(cfg.pool, cfg.pool_size, cfg.seed)
    mis, al = shot_histories(items, pairs, max(cfg.ks), cfg.seed)
    base, ft, sae, layer = _models(cfg)
    tok = base.tokenizer
    systems = system_texts(cfg.systems, cfg.prompts.startswith("organism"),
                           {"default": cfg.default_system, "safety": cfg.safety_system})
    check_known_words(tok, systems)
    ks, longest, skipped = _fitting_ks(base, tok, items, mis, cfg.ks, systems)
    if not ks:
        raise SaediffError(f"no k in {cfg.ks} fits the model's {base.max_positions} positions")
    ref = references(cfg, base, ft, sae, layer, items, pairs)
    dose: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for si, (sname, stext) in enumerate(systems.items()):
        dose[sname] = {}
        for cname, lm, ctx in conditions(cfg, base, ft, sae, layer, ref):
            if si and cname not in ("base", "finetuned"):
                continue  # rerouting under the first system condition only
            log.info("system %s, %s: k = %s", sname, cname, ks)
            dose[sname][cname] = [one_k(cfg, lm, sae, layer, items, mis, al, k, stext, ctx, ref,
                                        cname == "base" and si == 0) for k in ks]
    s0 = next(iter(dose))
    kmax = dose[s0]["base"][-1]
    latents = {"finetune_top": ref["finetune_top"], "k": kmax["k"],
               "icl_top": kmax.get("icl_top_latents", []),
               "overlap": kmax.get("overlap_with_finetune"),
               "reroute": {c: {"icl_top": rows[-1].get("icl_top_latents", []),
                               "overlap": rows[-1].get("overlap_with_finetune")}
                           for c, rows in dose[s0].items() if c.startswith("finetuned_")}}
    return {"layer": layer, "ks": ks, "skipped_ks": skipped, "longest_context": longest,
            "n_questions": len(items), "pool": cfg.pool, "behaviour": cfg.behaviour,
            "systems": systems, "fine_tune_direction": ref["direction_name"],
            "clamp_latent": ref["clamp_latent"], "reference_cosines": ref["reference_cosines"],
            "models": {"base": base.provenance(), "finetuned": ft.provenance()},
            "dose_response": dose, "reach": {s: reach(d, ks) for s, d in dose.items()},
            "latents": latents, "seconds": round(time.time() - t0, 1)}
