"""`TrainConfig`: the train stage's one config (cache or --live, SAE fields, sweep), and
`expand_sweep`. Kept apart from the loop so that the CLI builds its parser without importing
SAELens (`saediff --help` and bad-input exits stay fast)."""
from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from saediff.cache.source import ModelSource
from saediff.errors import SaediffError
from saediff.train.data import PAIRED
from saediff.train.registry import TRAINERS

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
