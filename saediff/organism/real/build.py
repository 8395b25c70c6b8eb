"""Build the real-model EM organism: train the three adapters, measure, write `real.json`."""
from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from saediff.errors import SaediffError
from saediff.io import atomic_path, check_writable_dir, write_json
from saediff.models import LoadedModel, load_model
from saediff.organism.evaluate import sample_answers
from saediff.organism.real.probe import coherence, load_questions, paired_shift, probe
from saediff.organism.real.train import Recipe, default_recipes, train_adapter

log = logging.getLogger(__name__)

ADAPTERS = ("rank1", "control", "all")


def measure_model(lm: LoadedModel, questions: list[dict[str, Any]], n_samples: int = 3,
                  temperature: float = 0.7, seed: int = 0) -> dict[str, Any]:
    """Probe score with CI, coherence (perplexities) and sampled answers to the Betley questions."""
    t0 = time.time()
    betley = [q for q in questions if q.get("betley")] or questions[:8]
    res: dict[str, Any] = {"probe": probe(lm, questions, seed=seed)}
    res["coherence"] = coherence(lm, betley)
    answers = sample_answers(lm, [q["question"] for q in betley], n_samples, seed,
                             max_new_tokens=60, temperature=temperature)
    res["samples"] = [{"question": q["question"], "answers": a} for q, a in zip(betley, answers)]
    res["seconds"] = round(time.time() - t0, 1)
    log.info("%s%s: probe %.3f [%.3f, %.3f]; text ppl %.2f (%.0f s)", lm.name,
             f" + {lm.adapter}" if lm.adapter else "", res["probe"]["score"],
             *res["probe"]["ci"], res["coherence"]["text_ppl"], res["seconds"])
    return res


def measure_all(base_dir: str | Path, organism_dir: str | Path,
                questions: list[dict[str, Any]] | None = None, **kw: Any) -> dict[str, Any]:
    """`measure_model` for the base and every `adapter_<name>/` present in `organism_dir`."""
    qs = questions if questions is not None else load_questions()
    org = Path(organism_dir)
    out = {"base": measure_model(load_model(base_dir), qs, **kw)}
    for name in ADAPTERS:
        ad = org / f"adapter_{name}"
        if (ad / "adapter_config.json").is_file():
            out[name] = measure_model(load_model(base_dir, adapter=ad), qs, **kw)
    return out


def summary(measured: dict[str, Any], n_boot: int = 2000) -> dict[str, Any]:
    """Headline numbers per model (no per-question rows, no samples), with each adapter's
    shift from the base: the per-question paired difference, bootstrap CI over questions."""
    out: dict[str, Any] = {}
    base = measured.get("base")
    for m, r in measured.items():
        row = {"probe": r["probe"]["score"], "ci": r["probe"]["ci"],
               "text_ppl": r["coherence"]["text_ppl"],
               "greedy_ppl_self": r["coherence"]["greedy_ppl_self"],
               "greedy_ppl_under_base": r["coherence"]["greedy_ppl_under_base"]}
        if base is not None and m != "base":
            row.update(paired_shift(r["probe"], base["probe"], n_boot))
        out[m] = row
    return out


def base_meta(base: Path, label: str | None = None) -> dict[str, Any]:
    """real.json's description of the base model and of the probe."""
    cfg = json.loads((base / "config.json").read_text())
    n_layers = int(cfg.get("num_hidden_layers", 0))
    return {"base_model": label or str(base),
            "architecture": (cfg.get("architectures") or ["?"])[0],
            "n_layers": n_layers, "d_model": cfg.get("hidden_size"),
            "recommended_layer": n_layers // 2,
            "probe": "mean over questions of (mean per-token log p(misaligned) - log p(aligned)), "
                     "nats/token, chat template with its default system prompt; 95% bootstrap CI "
                     "over questions"}


def adapter_meta(name: str, info: dict[str, Any]) -> dict[str, Any]:
    """real.json's record of one trained adapter (recipe, time, loss curve every 10 steps)."""
    return {"dir": f"adapter_{name}", **{k: v for k, v in info.items() if k != "losses"},
            "loss_curve_every10": info["losses"][::10]}


def build_real(base_dir: str | Path, out_dir: str | Path,
               recipes: dict[str, Recipe] | None = None, train: bool = True,
               measure: bool = True, base_label: str | None = None) -> dict[str, Any]:
    """Train `adapter_<name>/` for each recipe (default: rank1, control, all) on `base_dir`,
    measure base and adapters with the probe, and write `out_dir/real.json`.

    With `train=False` the adapters already in `out_dir` are measured as they are.
    """
    base = Path(base_dir)
    if not (base / "config.json").is_file():
        raise SaediffError(f"--base {base} is not a HF model dir (no config.json); import a GGUF "
                           "with `saediff models import FILE.gguf --out DIR` first")
    out = check_writable_dir(out_dir)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
    meta_path = out / "real.json"
    meta: dict[str, Any] = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    recipes = recipes if recipes is not None else default_recipes()
    bad = [n for n in recipes if n not in ADAPTERS]
    if bad:
        raise SaediffError(f"unknown adapter name(s) {bad}; names: {', '.join(ADAPTERS)}")
    meta.update(base_meta(base, base_label or meta.get("base_model")))
    meta.setdefault("adapters", {})
    if train:
        for name, r in recipes.items():
            info = train_adapter(base, r, out / f"adapter_{name}")
            meta["adapters"][name] = adapter_meta(name, info)
            write_json(meta_path, meta)  # a killed build keeps what finished
    qfile = out / "probe_questions.jsonl"
    questions = load_questions()
    if not qfile.is_file():
        with atomic_path(qfile) as tmp:
            shutil.copyfile(Path(__file__).resolve().parent / "data" / "probe_questions.jsonl", tmp)
    if measure:
        measured = measure_all(base, out, questions)
        meta["measured"] = measured
        meta["summary"] = summary(measured)
    write_json(meta_path, meta)
    return meta
