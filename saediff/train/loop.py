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
import logging
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from saediff.errors import SaediffError
from saediff.io import append_jsonl, mark_complete, output_lock
from saediff.train.config import ARCHITECTURES, DEFAULT_CACHE, INPUTS, TrainConfig, expand_sweep  # noqa: F401 (API)
from saediff.train.data import PAIRED, check_caches, estimate_scale, open_store, open_training_data  # noqa: F401 (API)
from saediff.train.registry import SAELENS_ARCHITECTURES, TRAINERS, build_sae  # noqa: F401
from saediff.train.run import Run, build_trainers, open_run, prepare_dirs, resume
from saediff.train.trainer import save_checkpoint

log = logging.getLogger(__name__)


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
