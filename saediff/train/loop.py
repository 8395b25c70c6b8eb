"""Train dictionaries (SAELens SAEs, crosscoders) on one layer out of the HDF5 activation
cache, or live from the model(s): the one training loop.

One store feeds every dictionary of a sweep: each step reads one batch and every trainer
trains on it. Each dictionary has a trainer of the `train.registry.DictionaryTrainer`
interface: SAELens SAEs a SAELens `SAETrainer` (`train.trainer`; TopK/BatchTopK SAEs swap its
dense step for the sparse one in `train.sparse`), crosscoders `train.crosscoder_trainer`.
Inputs are scaled to mean norm sqrt(d_in) when `normalize` is on (`train.data.estimate_scale`)
and the factor is folded into the saved weights, so a saved dictionary works on raw
activations. Checkpoints are atomic and resume bit-for-bit (store position, optimizer,
schedules, tracking state, RNG). The steps read top to bottom in `_train` (setup steps in
`train.run`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from saediff.cache.source import ModelSource
from saediff.errors import SaediffError
from saediff.io import append_jsonl, mark_complete, output_lock
from saediff.train.data import PAIRED, check_caches, estimate_scale, open_store, open_training_data  # noqa: F401 (API)
from saediff.train.registry import SAELENS_ARCHITECTURES, TRAINERS, build_sae  # noqa: F401
from saediff.train.run import Run, build_trainers, open_run, prepare_dirs, resume
from saediff.train.trainer import save_checkpoint

log = logging.getLogger(__name__)

ARCHITECTURES = tuple(TRAINERS)
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
        if self.k > self.d_sae and self.architecture not in PAIRED:
            raise SaediffError(f"k ({self.k:g}) must be <= d_sae ({self.d_sae}): an SAE cannot "
                               "keep more active latents than it has; lower --k or raise --d-sae")
        if self.total_tokens < self.batch_size:
            raise SaediffError(f"total_tokens ({self.total_tokens}) is less than one batch "
                               f"(batch_size {self.batch_size}); raise --total-tokens or lower "
                               "--batch-size")
        if self.input not in INPUTS:
            raise SaediffError(f"input must be one of {INPUTS}, got {self.input!r}")
        if self.architecture in PAIRED and self.input != "activations":
            raise SaediffError(f"architecture {self.architecture}: input must be 'activations' "
                               "(it reads both models itself)")
        swept = {self.architecture, *self.sweep.get("architecture", [])}
        if swept & PAIRED and len(swept) > 1:  # one store: pairs, or one model's rows
            raise SaediffError("sweep: a crosscoder reads (base, fine-tuned) pairs, an SAE one "
                               "model's rows; sweep crosscoders and SAEs in separate runs")
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


# --- the loop (SAELens's `SAETrainer.fit` is the model: named steps, top to bottom) ----------

def train(cfg: TrainConfig, *, stop_after: int | None = None, evals: bool = True,
          store: Any = None) -> list[Path]:
    """Train every dictionary of `cfg` (resuming from `out` if it holds a checkpoint).

    Returns the run directories. `stop_after` ends the loop early at that step without
    finishing (used to simulate an interruption); `store` replaces the cache store (any
    iterator of [B, d] batches, [B, 2, d] for a crosscoder, with state_dict/load_state_dict,
    e.g. `TensorStore`).
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
    if cfg.input == "difference" and evals:
        evals = False  # the evals read raw activations of a source, not differences
        log.info("input=difference: skipping the per-source evals")
    if evals and store is not None and not all(Path(c).is_file() for c in cfg.cache or []):
        evals = False  # the evals read the config's caches; a given store is none of them
        log.info("a store was given and the config's cache is absent: skipping the evals")
    try:
        return _train(cfg, stop_after, evals, store, world)
    finally:
        torch.set_num_threads(threads)


def _train(cfg: TrainConfig, stop_after: int | None, evals: bool, store: Any,
           world: Any) -> list[Path]:
    """Setup, fit, finish: the runs of one config, every one a trainer of the one loop."""
    from saediff.dist import barrier
    from saediff.train.layers import layer_groups

    groups = layer_groups(cfg)  # (None, cfg), or --live --layers: (L, cfg at L) per layer
    runs = [(key, name, rcfg) for key, lcfg in groups for name, rcfg in expand_sweep(lcfg)]
    run = open_run(cfg, groups, runs, store, world)
    run.trainers = build_trainers(run)  # before writing anything: a refusal leaves no run dir
    prepare_dirs(run)
    resume(run)
    if not _fit(run, stop_after):
        return run.dirs
    if world.is_main:
        _finish(run, evals)
    barrier()  # the other ranks return once rank 0 has written the dictionaries and evals
    return run.dirs


def _fit(run: Run, stop_after: int | None) -> bool:
    """Steps from the resumed one to the end; False when `stop_after` ended it early."""
    cfg = run.cfg
    bar = tqdm(total=cfg.steps, initial=run.start, desc="train", unit="step",
               disable=None if run.world.is_main else True)
    step = run.start
    try:
        while step < cfg.steps:
            if stop_after is not None and step >= stop_after:
                return False
            outs = _train_step(run, step)
            step += 1
            _after_step(run, step, outs, bar)
    finally:
        bar.close()
        if hasattr(run.store, "close") and step >= cfg.steps:
            run.store.close()
    return True


def _train_step(run: Run, step: int) -> list[dict[str, Any]]:
    """Every trainer steps on this step's batch of its group; a non-finite loss stops the
    run with one line naming the step, the run and the last good checkpoint."""
    from saediff.train.layers import next_batches

    batches = {k: run.dp.local(b) for k, b in next_batches(run.store, run.keys).items()}
    outs = []
    for tr, (key, name, _) in zip(run.trainers, run.runs):
        try:
            outs.append(tr.step(batches[key]))
        except FloatingPointError as exc:
            name = "/".join(p for p in (f"layer {key}" if key is not None else "", name) if p)
            where = f"last good checkpoint: step {run.last_ck}" if run.last_ck else \
                "no checkpoint written yet"
            raise SaediffError(f"non-finite loss at step {step}"
                               f"{' in ' + name if name else ''} ({exc}); training stopped, "
                               f"{where} in {run.root / 'checkpoints'}") from exc
    return outs


def _after_step(run: Run, step: int, outs: list[dict[str, Any]], bar: Any) -> None:
    """Step counters, then (rank 0) the metrics line and the checkpoint when due."""
    cfg = run.cfg
    for tr in run.trainers:
        tr.n_training_steps = step
        tr.maybe_reset_sparsity()
    checkpoint = (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) \
        or step == cfg.steps
    if checkpoint and hasattr(run.store, "sync_state"):
        run.store.sync_state()  # a live store under torchrun: every rank's position
    if not run.world.is_main:
        return
    if step % cfg.log_every == 0 or step == cfg.steps:
        for tr, out, rdir in zip(run.trainers, outs, run.dirs):
            append_jsonl(rdir / "metrics.jsonl", tr.metrics(out, step))
        bar.set_postfix(loss=f"{float(outs[0]['loss'].detach()):.4g}",
                        l0=f"{float(outs[0]['l0']):.1f}")
    if checkpoint:
        save_checkpoint(run.root, step, run.trainers, run.store, run.extra)
        run.last_ck = step
    bar.update(1)


def _finish(run: Run, evals: bool) -> None:
    """Rank 0: every dictionary saved and marked complete, its evals and training curves."""
    from saediff.train.plots import write_curves

    # a live run's evals read its held-out documents, run once through the models, from RAM
    eval_caches: dict[Any, Any] = {}
    if evals and run.cfg.live:  # per layer: one eval pass per layer
        from saediff.train.data import live_eval_cache

        eval_caches = {key: [live_eval_cache(lcfg, run.models)] for key, lcfg in run.groups}
    for tr, rdir, (key, _, rcfg) in zip(run.trainers, run.dirs, run.runs):
        tr.save_final(rdir)
        mark_complete(rdir)  # the dictionary is whole: readers may load it (evals read it too)
        if evals:
            tr.write_evals(rdir, rcfg, models=run.models, caches=eval_caches.get(key))
        write_curves(rdir / "metrics.jsonl", rdir / "curves.html")
