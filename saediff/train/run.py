"""A training run's shared state (`Run`) and the setup steps of `train.loop`'s one loop:
open the data and the run directories, build one trainer per dictionary, resume."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from saediff.config import config_to_dict
from saediff.io import check_writable_dir, mark_incomplete, safe_child, write_json
from saediff.train.data import open_training_data
from saediff.train.final import truncate_metrics
from saediff.train.registry import make_trainer
from saediff.train.trainer import check_resume_config, load_checkpoint

log = logging.getLogger(__name__)

# Fields that may change between an interrupted run and its resumption (they do not change
# what is trained); every other field must match the checkpoint's.
RESUME_FREE = {"out", "d_in", "eval_rows", "eval_sequences", "checkpoint_every", "log_every",
               "device", "threads"}


def resume_fields(cfg: Any) -> dict[str, Any]:
    return {k: v for k, v in config_to_dict(cfg).items() if k not in RESUME_FREE}


@dataclass
class Run:
    """What the named steps of one `train.loop._train` call share."""

    cfg: Any
    world: Any
    dp: Any
    store: Any
    info: dict[str, Any]
    models: dict[str, Any] | None
    groups: list[tuple[int | None, Any]]   # (layer key or None, its config)
    runs: list[tuple[int | None, str, Any]]  # (key, sweep name, config) per trainer
    root: Path
    dirs: list[Path]
    trainers: list[Any] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # what every checkpoint records
    start: int = 0
    last_ck: int | None = None

    @property
    def keys(self) -> list[int | None]:
        return [key for key, _ in self.groups]


def open_run(cfg: Any, groups: list[tuple[int | None, Any]],
             runs: list[tuple[int | None, str, Any]], store: Any, world: Any) -> Run:
    """The data and the run directory of every run (sweep entry, per layer group)."""
    from saediff.train.ddp import DataParallel

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
    dirs = [safe_child(roots[key], name, "sweep run name") if name else roots[key]
            for key, name, _ in runs]
    return Run(cfg, world, dp, store, info, models, groups, runs, root, dirs)


def build_trainers(run: Run) -> list[Any]:
    """One trainer per run (`registry.make_trainer`), its dictionary seeded from its config."""
    from saediff.train.layers import layer_meta

    cfg, info = run.cfg, run.info
    base_model = info["models"].get("base", next(iter(info["models"].values()), {}))
    meta = {"hook_name": info["hook_name"], "layer": info["layer"],
            "model_name": base_model.get("name", ""), "saediff_sources": cfg.sources,
            "saediff_input": cfg.input, "saediff_models": info["models"],
            "saediff_caches": [str(p) for p in cfg.cache or []], "saediff_roles": cfg.roles,
            "saediff_live": cfg.live, "saediff_world_size": run.world.world_size}
    trainers = [make_trainer(rcfg, info["d_model"], layer_meta(meta, key), run.store)
                for key, _, rcfg in run.runs]
    for tr in trainers:
        tr.ddp = run.dp if run.world.active else None
    return trainers


def prepare_dirs(run: Run) -> None:
    """Each run directory: its config, marked incomplete until the end (load_sae refuses it)."""
    from saediff.dist import barrier

    for (_, _, rcfg), rdir in zip(run.runs, run.dirs) if run.world.is_main else []:
        rdir.mkdir(parents=True, exist_ok=True)
        write_json(rdir / "train_config.json", config_to_dict(rcfg))
        mark_incomplete(rdir, "saediff train")
    barrier()


def resume(run: Run) -> None:
    """Load the latest checkpoint (every rank the same one), refuse a changed config, set
    the input scales (the checkpoint's, or `estimate_scale`'s) and cut the metrics back."""
    from saediff.train.layers import group_scales, packed_scales

    cfg, keys = run.cfg, run.keys
    state = load_checkpoint(run.root, run.trainers, run.store)
    fields = {**resume_fields(cfg), "cache_models": run.info["models"],
              "cache_layer": run.info["layer"]}
    check_resume_config(fields, state, run.root)
    if state:
        log.info("resumed from %s (step %d)", state["dir"], state["step"])
    run.start = state["step"] if state else 0
    run.last_ck = run.start if state else None
    scales = group_scales(cfg, run.store, run.info["d_model"], keys,
                          state["scale"] if state else None)
    for tr, (key, _, _) in zip(run.trainers, run.runs):
        tr.activation_scaler.scaling_factor = scales[key] if cfg.normalize else None
    for rdir in run.dirs if run.world.is_main else []:
        truncate_metrics(rdir / "metrics.jsonl", run.start)
    run.extra = {"n_saes": len(run.trainers), "scale": packed_scales(scales, keys),
                 "config": fields}


