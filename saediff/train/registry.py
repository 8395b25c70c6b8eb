"""The one training loop's trainer interface, and which trainer trains which architecture.

`train.loop` trains every dictionary through `DictionaryTrainer`: SAELens SAEs with
`train.trainer.FastSAETrainer`, crosscoders with `train.crosscoder_trainer.CrosscoderTrainer`.
A new architecture implements the interface and registers a factory in `TRAINERS`
(docs/adding_an_architecture.md); the loop then gives it checkpoints, bit-exact resume, the
input scale, the NaN guard, metrics, evals and torchrun.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch

from saediff.errors import SaediffError

SAELENS_ARCHITECTURES = ("topk", "batchtopk", "standard", "jumprelu", "gated",
                         "matryoshka_batchtopk", "abstopk")


class DictionaryTrainer(Protocol):
    """What `train.loop` needs of a trainer (one per dictionary of a sweep)."""

    sae: torch.nn.Module
    """The model being trained; its `W_enc` shape is checked against a checkpoint's."""
    activation_scaler: Any
    """`scaling_factor`: the input scale the loop sets (`estimate_scale`, or None)."""
    ddp: Any
    """`train.ddp.DataParallel` under torchrun (set by the loop), else None."""
    n_training_steps: int
    """Steps taken; the loop sets it after every step."""

    def step(self, batch: torch.Tensor) -> dict[str, Any]:
        """One optimizer step on this rank's share of a batch: {"loss", "l0", ...}; raises
        FloatingPointError before touching the weights when the (global) loss is not finite."""

    def maybe_reset_sparsity(self) -> Any:
        """Periodic bookkeeping after a step (SAELens's running sparsity statistics)."""

    def metrics(self, out: dict[str, Any], step: int) -> dict[str, Any]:
        """One metrics.jsonl line (step, tokens, loss, l0, dead_frac, fvu_batch, lr, ...)."""

    def state_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Everything a bit-exact resume needs: tensors (safetensors) and JSON metadata."""

    def load_state_tensors(self, t: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Restore `state_tensors`'s output."""

    def save_final(self, run_dir: Path) -> None:
        """Save the trained dictionary into `run_dir` (input scale folded in); `load_sae`
        must read it."""

    def write_evals(self, run_dir: Path, cfg: Any, models: dict[str, Any] | None = None,
                    caches: list[Any] | None = None) -> Path:
        """evals.json of the saved dictionary on held-out data."""


def build_sae(cfg: Any, d_in: int, metadata: dict[str, Any]) -> Any:
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


def _saelens_trainer(cfg: Any, d_in: int, metadata: dict[str, Any],
                     store: Any) -> DictionaryTrainer:
    from saediff.train.trainer import FastSAETrainer

    return FastSAETrainer(cfg, build_sae(cfg, d_in, metadata), store)


def _crosscoder_trainer(cfg: Any, d_in: int, metadata: dict[str, Any],
                        store: Any) -> DictionaryTrainer:
    from saediff.train.crosscoder_trainer import CrosscoderTrainer

    return CrosscoderTrainer(cfg, d_in, metadata, store)


Factory = Callable[[Any, int, dict[str, Any], Any], DictionaryTrainer]

# architecture -> factory(cfg, d_in, metadata, store); SAELens's architectures share one
TRAINERS: dict[str, Factory] = {**{a: _saelens_trainer for a in SAELENS_ARCHITECTURES},
                                "crosscoder": _crosscoder_trainer}


def make_trainer(cfg: Any, d_in: int, metadata: dict[str, Any], store: Any) -> DictionaryTrainer:
    """The trainer of `cfg.architecture`, its dictionary built (and seeded) from `cfg`."""
    if cfg.architecture not in TRAINERS:
        raise SaediffError(f"architecture must be one of {tuple(TRAINERS)}, "
                           f"got {cfg.architecture!r}")
    return TRAINERS[cfg.architecture](cfg, d_in, metadata, store)
