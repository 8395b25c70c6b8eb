"""Train SAELens SAEs on one layer out of the HDF5 activation cache (no language model).

One `ActivationStore` feeds every SAE of a sweep: each step reads one batch and all SAEs
train on it. Each SAE has a SAELens `SAETrainer` (its optimizer bookkeeping, LR and
coefficient schedules, dead-latent tracking); TopK/BatchTopK SAEs swap its dense train step
for the sparse one in `saediff.train.sparse`. Inputs are scaled to mean norm sqrt(d_in) when
`normalize` is on and the factor is folded into the saved weights, so a saved SAE works on raw
activations. Checkpoints are atomic and resume bit-for-bit (store position, optimizer,
schedules, tracking state, RNG).
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from saediff.cache.source import ModelSource
from saediff.config import config_to_dict
from saediff.errors import SaediffError
from saediff.io import (check_writable_dir, json_dumps, mark_complete, mark_incomplete,
                        output_lock, safe_child, write_json)
from saediff.train.data import (check_caches, estimate_scale, open_store,  # noqa: F401 (API)
                                open_training_data)
from saediff.train.final import save_final, truncate_metrics
from saediff.train.trainer import check_resume_config, load_checkpoint, save_checkpoint

log = logging.getLogger(__name__)

ARCHITECTURES = ("topk", "batchtopk", "standard", "jumprelu", "gated", "matryoshka_batchtopk",
                 "abstopk", "crosscoder")
INPUTS = ("activations", "difference")


DEFAULT_CACHE = "activations_cache/cache.h5"


@dataclass
class TrainConfig(ModelSource):
    """`saediff train`: on a cache (--cache), or --live with the model/document options of
    `saediff cache` (inherited from `ModelSource`: --base, --layer, --dataset, ...)."""

    cache: list[str] | None = None
    """Activation cache file(s) written by `saediff cache` (default activations_cache/cache.h5)."""
    live: bool = False
    """Train straight from the model(s) (--base/--finetuned, --layer, --dataset ...): no cache."""
    buffer_tokens: int | None = None
    """--live: rows in the mixing buffer (default: what fits 1 GiB in --dtype)."""
    lm_batch_size: int = 16
    """--live: sequences per model forward pass."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """--live: storage dtype of the mixing buffer (the SAE always computes in float32)."""
    out: str = "runs/sae"
    """Run directory (for a sweep: one sub-directory per SAE)."""
    sources: dict[str, float] = field(default_factory=lambda: {"base": 0.5, "finetuned": 0.5})
    """Cache sources and their share of each batch, e.g. base=0.5,finetuned=0.5."""
    d_in: int | None = None
    """Expected activation width (d_model); checked against the cache when given."""
    roles: list[str] | None = None
    """Token roles to train on (special, prompt, response, text); default all but special."""
    architecture: Literal["topk", "batchtopk", "standard", "jumprelu", "gated",
                          "matryoshka_batchtopk", "abstopk", "crosscoder"] = "topk"
    """SAELens architecture to train, or `crosscoder` (one encoder over the base and
    fine-tuned activations of the same token, one decoder per model; needs a paired cache)."""
    input: Literal["activations", "difference"] = "activations"
    """What the SAE reads: cached activations of `sources`, or `difference` = fine-tuned −
    base activations of the same tokens (a diff-SAE; needs a paired cache)."""
    d_sae: int = 768
    """Number of latents."""
    k: float = 16
    """Active latents per token (topk, batchtopk, matryoshka_batchtopk, abstopk)."""
    l1_coefficient: float = 5.0
    """Sparsity penalty coefficient (standard, gated: L1; jumprelu: L0)."""
    sae_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra SAELens training-config fields for the architecture (YAML mapping)."""
    sweep: dict[str, list[Any]] = field(default_factory=dict)
    """Grid of overrides, e.g. {k: [8, 16], d_sae: [768, 1536]}: one SAE per combination."""
    total_tokens: int = 2_000_000
    """Training tokens (rows) per SAE."""
    batch_size: int = 4096
    """Rows per training step."""
    lr: float = 4e-4
    """Adam learning rate."""
    lr_scheduler: Literal["constant", "cosineannealing"] = "constant"
    """LR schedule after warm-up."""
    lr_warm_up_steps: int = 0
    """Linear LR warm-up steps."""
    lr_decay_steps: int = 0
    """Linear LR decay-to-zero steps at the end."""
    normalize: bool = True
    """Scale inputs to mean norm sqrt(d_in) while training (folded into the saved SAE)."""
    norm_batches: int = 20
    """Batches used to estimate the normalisation factor."""
    dead_feature_window: int = 500
    """Steps without firing after which a latent counts as dead (TopK auxiliary loss)."""
    eval_fraction: float = 0.05
    """Share of sequences held out for evals (never trained on)."""
    eval_rows: int = 50_000
    """Max held-out rows per source for FVU / L0 / dead / dense."""
    eval_sequences: int = 64
    """Held-out sequences per source for the spliced next-token loss / KL (0 skips)."""
    checkpoint_every: int = 200
    """Steps between checkpoints (0: only at the end)."""
    log_every: int = 10
    """Steps between metrics.jsonl lines."""
    fast_path: bool = True
    """Use the sparse TopK/BatchTopK step (same gradients as SAELens, several times faster)."""
    buffer_rows: int = 1 << 18
    """Shuffle buffer rows per source stream."""
    seed: int = 0
    """Seed for SAE initialisation and data order."""
    threads: int = 0
    """torch intra-op threads (0: auto = 1 for small SAEs, where threads only add sync cost)."""
    allow_partial: bool = False
    """Train on the committed prefix of an incomplete cache (NAME.h5.partial) instead of refusing."""
    layers: str | list[int] | None = None
    """One SAE (or sweep) per layer of a multi-layer cache or --live, in OUT/layer_<L>/ (6,12,18)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.cache, str):
            self.cache = [self.cache]
        from saediff.train.data import check_data_source

        check_data_source(self)  # --live and its model options, or cache file(s)
        if self.cache is None and not self.live:
            self.cache = [DEFAULT_CACHE]
        if self.architecture not in ARCHITECTURES:
            raise SaediffError(f"architecture must be one of {ARCHITECTURES}, "
                             f"got {self.architecture!r}")
        for name in ("d_sae", "total_tokens", "batch_size", "norm_batches", "log_every"):
            if getattr(self, name) <= 0:
                raise SaediffError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("k", "l1_coefficient", "lr", "eval_fraction"):
            if not math.isfinite(getattr(self, name)):
                raise SaediffError(f"{name} must be a finite number, got {getattr(self, name)}")
        if self.k <= 0:
            raise SaediffError(f"k must be > 0, got {self.k}")
        if self.k > self.d_sae and self.architecture != "crosscoder":
            raise SaediffError(f"k ({self.k:g}) must be <= d_sae ({self.d_sae}): an SAE cannot "
                               "keep more active latents than it has; lower --k or raise --d-sae")
        if self.total_tokens < self.batch_size:
            raise SaediffError(f"total_tokens ({self.total_tokens}) is less than one batch "
                               f"(batch_size {self.batch_size}); raise --total-tokens or lower "
                               "--batch-size")
        if self.input not in INPUTS:
            raise SaediffError(f"input must be one of {INPUTS}, got {self.input!r}")
        if self.architecture == "crosscoder" and (self.sweep or self.input != "activations"):
            raise SaediffError("architecture crosscoder: no sweep, and input must be "
                             "'activations' (it reads both models itself)")
        if not 0.0 < self.eval_fraction < 1.0:
            raise SaediffError(f"eval_fraction must be in (0, 1), got {self.eval_fraction}")
        if self.lr <= 0:
            raise SaediffError(f"lr must be > 0, got {self.lr}")
        bad = set(self.sweep) - {f.name for f in dataclasses.fields(self)} | \
            set(self.sweep) & {"cache", "out", "sources", "roles", "sweep", "batch_size",
                               "total_tokens", "seed", "eval_fraction", "buffer_rows", "live",
                               "buffer_tokens", "lm_batch_size", "dtype",
                               *(f.name for f in dataclasses.fields(ModelSource))}
        if bad:
            raise SaediffError(f"sweep: cannot sweep over {sorted(bad)} (SAE fields only)")

    @property
    def steps(self) -> int:
        return max(1, self.total_tokens // self.batch_size)


def expand_sweep(cfg: TrainConfig) -> list[tuple[str, TrainConfig]]:
    """(name, config) per SAE of the sweep; a single run is named ''."""
    if not cfg.sweep:
        return [("", cfg)]
    keys = list(cfg.sweep)
    runs = []
    for combo in itertools.product(*(cfg.sweep[k] for k in keys)):
        over = dict(zip(keys, combo))
        name = "_".join(f"{k}{v}" for k, v in over.items())
        runs.append((name, dataclasses.replace(cfg, sweep={}, **over)))
    return runs


# --- SAE construction ------------------------------------------------------------------------

def build_sae(cfg: TrainConfig, d_in: int, metadata: dict[str, Any]) -> Any:
    """A SAELens training SAE of `cfg.architecture` (seeded by cfg.seed)."""
    import sae_lens  # noqa: F401  (registers the architectures)
    from sae_lens.registry import get_sae_training_class
    from sae_lens.saes.sae import SAEMetadata

    sae_cls, cfg_cls = get_sae_training_class(cfg.architecture)
    names = {f.name for f in dataclasses.fields(cfg_cls)}
    kw: dict[str, Any] = {"d_in": d_in, "d_sae": cfg.d_sae, "device": cfg.device,
                          "dtype": "float32",
                          "normalize_activations": "expected_average_only_in" if cfg.normalize
                          else "none"}
    if "k" in names:
        kw["k"] = cfg.k if cfg.architecture != "topk" and cfg.architecture != "abstopk" \
            else int(cfg.k)
    if "l1_coefficient" in names:
        kw["l1_coefficient"] = cfg.l1_coefficient
    if "l0_coefficient" in names:
        kw["l0_coefficient"] = cfg.l1_coefficient
    if cfg.architecture == "matryoshka_batchtopk" and "matryoshka_widths" not in cfg.sae_kwargs:
        kw["matryoshka_widths"] = [cfg.d_sae // 4, cfg.d_sae // 2, cfg.d_sae]
    unknown = set(cfg.sae_kwargs) - names
    if unknown:
        raise SaediffError(f"sae_kwargs: {sorted(unknown)} are not fields of "
                           f"{cfg_cls.__name__} (known: {sorted(names)})")
    kw.update(cfg.sae_kwargs)
    torch.manual_seed(cfg.seed)
    return sae_cls(cfg_cls(**kw, metadata=SAEMetadata(**metadata)))


def _make_trainer(cfg: TrainConfig, sae: Any, store: Any) -> Any:
    from saediff.train.trainer import FastSAETrainer

    return FastSAETrainer(cfg, sae, store)


# --- the loop --------------------------------------------------------------------------------

# Fields that may change between an interrupted run and its resumption (they do not change
# what is trained); every other field must match the checkpoint's.
RESUME_FREE = {"out", "d_in", "eval_rows", "eval_sequences", "checkpoint_every", "log_every",
               "device", "threads"}


def _resume_fields(cfg: TrainConfig) -> dict[str, Any]:
    return {k: v for k, v in config_to_dict(cfg).items() if k not in RESUME_FREE}


def train(cfg: TrainConfig, *, stop_after: int | None = None, evals: bool = True,
          store: Any = None) -> list[Path]:
    """Train every SAE of `cfg` (resuming from `out` if it holds a checkpoint).

    Returns the run directories. `stop_after` ends the loop early at that step without
    finishing (used to simulate an interruption); `store` replaces the cache store (any
    iterator of [B, d] batches with state_dict/load_state_dict, e.g. `TensorStore`).
    """
    from saediff.dist import process_group, rank_device
    from saediff.train.ddp import check_supported

    threads = torch.get_num_threads()
    # under torchrun: one process group per run, each rank on its own GPU (no-op otherwise)
    with process_group(cfg.device) as world:
        check_supported(cfg, world)
        cfg = dataclasses.replace(cfg, device=rank_device(cfg.device))
        layer_cfgs = None
        if cfg.layers and not cfg.live:  # a cache: one run per layer, in turn (`train.layers`)
            from saediff.train.layers import per_layer_configs

            layer_cfgs = per_layer_configs(cfg)  # checked before --out is created
        # one writer per --out: a second `saediff train` into it gets one line, exit 2
        with output_lock(cfg.out) if world.is_main else contextlib.nullcontext():
            if layer_cfgs:
                return [d for c in layer_cfgs for d in
                        _train_one(c, stop_after, evals, store, world, threads)]
            return _train_one(cfg, stop_after, evals, store, world, threads)


def _train_one(cfg: TrainConfig, stop_after: int | None, evals: bool, store: Any, world: Any,
               threads: int) -> list[Path]:
    if cfg.architecture == "crosscoder":
        from saediff.train.crosscoder import train_crosscoder_run

        return [train_crosscoder_run(cfg, store, world)]
    if cfg.input == "difference" and evals:
        evals = False  # the evals read raw activations of a source, not differences
        log.info("input=difference: skipping the per-source evals")
    try:
        return _train(cfg, stop_after, evals, store, world)
    finally:
        torch.set_num_threads(threads)


def _train(cfg: TrainConfig, stop_after: int | None, evals: bool, store: Any,
           world: Any) -> list[Path]:
    from saediff.dist import barrier
    from saediff.train.ddp import DataParallel
    from saediff.train.layers import (group_scales, layer_groups, layer_meta, next_batches,
                                      packed_scales)

    groups = layer_groups(cfg)  # (None, cfg), or --live --layers: (L, cfg at L) per layer
    keys = [key for key, _ in groups]
    runs = [(key, name, rcfg) for key, lcfg in groups for name, rcfg in expand_sweep(lcfg)]
    dp = DataParallel(world, cfg.batch_size, cfg.device)
    store, info, models = open_training_data(cfg, world, store)
    dp.rank_local = bool(getattr(store, "rank_local", False))
    small = max(c.d_sae for _, _, c in runs) * cfg.batch_size * info["d_model"] < (1 << 30)
    if cfg.threads or (small and cfg.device == "cpu" and not cfg.live):  # live: the LM wants them
        torch.set_num_threads(cfg.threads or 1)
    # rank 0 owns the run directory (metrics, checkpoints, final SAE, evals); others only read
    root = check_writable_dir(cfg.out) if world.is_main else Path(cfg.out)
    # YAML sweep values become directory names: none may leave --out
    roots = {key: root if key is None else Path(lcfg.out) for key, lcfg in groups}
    run_dirs = [safe_child(roots[key], name, "sweep run name") if name else roots[key]
                for key, name, _ in runs]
    base_model = info["models"].get("base", next(iter(info["models"].values()), {}))
    meta = {"hook_name": info["hook_name"], "layer": info["layer"],
            "model_name": base_model.get("name", ""), "saediff_sources": cfg.sources,
            "saediff_input": cfg.input,
            "saediff_caches": [str(p) for p in cfg.cache or []], "saediff_roles": cfg.roles,
            "saediff_live": cfg.live,
            "saediff_world_size": world.world_size}
    # Build every SAE before writing anything, so a refused config leaves no half-made run dir.
    trainers = [_make_trainer(rcfg, build_sae(rcfg, info["d_model"], layer_meta(meta, key)),
                              store) for key, _, rcfg in runs]
    for tr in trainers:
        tr.ddp = dp if world.active else None
    for (_, name, rcfg), rdir in zip(runs, run_dirs):
        if world.is_main:
            rdir.mkdir(parents=True, exist_ok=True)
            write_json(rdir / "train_config.json", config_to_dict(rcfg))
            mark_incomplete(rdir, "saediff train")  # load_sae refuses it until the end
    barrier()
    state = load_checkpoint(root, trainers, store)  # every rank resumes from the same one
    fields = {**_resume_fields(cfg), "cache_models": info["models"], "cache_layer": info["layer"]}
    check_resume_config(fields, state, root)
    if state:
        log.info("resumed from %s (step %d)", state["dir"], state["step"])
    start = state["step"] if state else 0
    scales = group_scales(cfg, store, info["d_model"], keys, state["scale"] if state else None)
    for tr, (key, _, _) in zip(trainers, runs):
        tr.activation_scaler.scaling_factor = scales[key] if cfg.normalize else None
    for rdir in run_dirs if world.is_main else []:
        truncate_metrics(rdir / "metrics.jsonl", start)
    extra = {"n_saes": len(trainers), "scale": packed_scales(scales, keys), "config": fields}
    last_ck = state and start
    bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step",
               disable=None if world.is_main else True)
    step = start
    try:
        while step < cfg.steps:
            if stop_after is not None and step >= stop_after:
                return run_dirs
            batches = {k: dp.local(b) for k, b in next_batches(store, keys).items()}
            outs = []
            for tr, (key, name, _) in zip(trainers, runs):
                try:
                    outs.append(tr.step(batches[key]))
                except FloatingPointError as exc:
                    name = "/".join(p for p in (f"layer {key}" if key is not None else "", name)
                                    if p)
                    where = f"last good checkpoint: step {last_ck}" if last_ck else \
                        "no checkpoint written yet"
                    raise SaediffError(f"non-finite loss at step {step}"
                                       f"{' in ' + name if name else ''} ({exc}); training "
                                       f"stopped, {where} in {root / 'checkpoints'}") from exc
            step += 1
            for tr in trainers:
                tr.n_training_steps = step
                tr.maybe_reset_sparsity()
            checkpoint = (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) \
                or step == cfg.steps
            if checkpoint and hasattr(store, "sync_state"):
                store.sync_state()  # a live store under torchrun: every rank's position
            if not world.is_main:
                continue
            if step % cfg.log_every == 0 or step == cfg.steps:
                for tr, out, rdir in zip(trainers, outs, run_dirs):
                    with (rdir / "metrics.jsonl").open("a") as fh:
                        fh.write(json_dumps(tr.metrics(out, step)) + "\n")
                bar.set_postfix(loss=f"{float(outs[0]['loss'].detach()):.4g}",
                                l0=f"{float(outs[0]['l0']):.1f}")
            if checkpoint:
                save_checkpoint(root, step, trainers, store, extra)
                last_ck = step
            bar.update(1)
    finally:
        bar.close()
        if hasattr(store, "close") and step >= cfg.steps:
            store.close()
    # a live run's evals read its held-out documents, run once through the models, from RAM
    eval_caches: dict[Any, Any] = {}
    if evals and cfg.live and world.is_main:  # per layer: one eval pass per layer
        from saediff.train.data import live_eval_cache

        eval_caches = {key: [live_eval_cache(lcfg, models)] for key, lcfg in groups}
    for tr, rdir, (key, _, rcfg) in zip(trainers, run_dirs, runs) if world.is_main else []:
        save_final(tr, rdir)
        mark_complete(rdir)  # the SAE is whole: readers may load it (evals read it too)
        if evals:
            from saediff.train.evals import write_evals

            write_evals(rdir, rcfg, models=models, caches=eval_caches.get(key))
        from saediff.train.plots import write_curves

        write_curves(rdir / "metrics.jsonl", rdir / "curves.html")
    barrier()  # the other ranks return once rank 0 has written the SAE and its evals
    return run_dirs

