"""Data-parallel SAE training under `torchrun` (torch.distributed, gloo on CPU, nccl on CUDA).

Every rank opens an identically seeded store and draws the same *global* batch; rank r trains
on rows [r*B/N, (r+1)*B/N) of it. That makes N ranks compute exactly the 1-rank step (up to
float rounding of the sum), at the price of each rank reading the whole batch (N x the store
I/O; activations are small next to the SAE matmuls, and a rank-sliced store would change the
data order). After the local backward (autograd, or the sparse TopK step, which sets `.grad`
itself so DDP's autograd hooks would miss it) one flat `all_reduce` averages the gradients and
sums the per-latent fire counts, so clipping, Adam and dead-latent tracking see the same
numbers on every rank. Averaging per-rank *mean* losses equals the global mean only for equal
shares, hence B % N == 0. Row-separable losses (TopK, standard L1, JumpReLU, gated) give the
1-rank weights. BatchTopK (the sparse step and the crosscoder) keeps the k*B largest activations
of the *global* batch: each rank all-gathers its own top k*B values to find the global cut.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as tdist

from saediff.dist import Dist
from saediff.errors import SaediffError

log = logging.getLogger(__name__)


class DataParallel:
    """This rank's share of each global batch and the gradient/statistics all-reduce."""

    def __init__(self, world: Dist, batch_size: int, device: str):
        if batch_size % world.world_size:
            raise SaediffError(f"--batch-size {batch_size} (the global batch) must be divisible by"
                               f" the number of ranks ({world.world_size}) so every rank trains "
                               f"on an equal share; use a multiple of {world.world_size}")
        self.world, self.device = world, torch.device(device)
        self.share = batch_size // world.world_size
        # a live store under torchrun serves this rank's share itself (its own documents)
        self.rank_local = False
        # pinned host memory lets the copy to the GPU run asynchronously (flag: --device cuda)
        self.pin = self.device.type == "cuda"

    @property
    def active(self) -> bool:
        return self.world.active

    def local(self, batch: torch.Tensor) -> torch.Tensor:
        """Rows of the global batch that this rank trains on, on the training device, fp32."""
        if self.active and not self.rank_local:
            r = self.world.rank
            batch = batch[r * self.share: (r + 1) * self.share]
        if batch.device != self.device:
            if self.pin and batch.device.type == "cpu":
                batch = batch.pin_memory()
            batch = batch.to(self.device, non_blocking=self.pin)
        # SAE math stays fp32 even when the cache or the LM was bf16
        return batch.float()

    def sync(self, sae: torch.nn.Module, counts: torch.Tensor,
             stats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Average gradients and `stats` (losses) over ranks, sum `counts`; one all_reduce.

        Returns (global counts, averaged stats). A no-op outside torchrun.
        """
        if not self.active:
            return counts, stats
        params = [p for p in sae.parameters() if p.grad is not None]
        n = self.world.world_size
        flat = torch.cat([p.grad.reshape(-1) / n for p in params]
                         + [counts.float().reshape(-1), stats.float().reshape(-1) / n])
        tdist.all_reduce(flat)
        i = 0
        for p in params:
            p.grad.copy_(flat[i: i + p.numel()].view_as(p.grad))
            i += p.numel()
        counts = flat[i: i + counts.numel()].view_as(counts)
        return counts, flat[i + counts.numel():]

    def average_local(self, x: torch.Tensor) -> torch.Tensor:
        """Mean over ranks of a statistic of each rank's own rows (a rank-local store);
        `x` itself when every rank draws the same global batch or outside torchrun."""
        if self.active and self.rank_local:
            x = x.clone()
            tdist.all_reduce(x)
            x /= self.world.world_size
        return x

    def min(self, x: torch.Tensor) -> torch.Tensor:
        """Minimum of `x` over ranks (itself outside torchrun)."""
        if self.active:
            x = x.clone()
            tdist.all_reduce(x, op=tdist.ReduceOp.MIN)
        return x

    def kth_largest(self, local_top: torch.Tensor, n: int) -> torch.Tensor:
        """The n-th largest value over all ranks, given each rank's top values (equally many
        on every rank: equal shares). BatchTopK keeps what reaches it, as one rank would."""
        if self.active:
            parts = [torch.empty_like(local_top) for _ in range(self.world.world_size)]
            tdist.all_gather(parts, local_top.contiguous())
            local_top = torch.cat(parts)
        return local_top.topk(min(n, local_top.numel()), sorted=False).values.min()

    def sync_buffers(self, sae: torch.nn.Module) -> None:
        """Average running buffers the step updates from local data (BatchTopK threshold)."""
        if not self.active:
            return
        thr = getattr(sae, "topk_threshold", None)
        if torch.is_tensor(thr):
            tdist.all_reduce(thr)
            thr.div_(self.world.world_size)


def check_supported(cfg: Any, world: Dist) -> None:
    """Warn where data-parallel training only approximates a 1-rank run."""
    approximate = cfg.architecture == "matryoshka_batchtopk" or (
        cfg.architecture == "batchtopk" and not cfg.fast_path)
    if world.active and approximate:
        log.warning("%s under %d ranks selects the top k*B/N activations of each rank's share, "
                    "not of the whole batch: close to, but not the same as, a 1-rank run "
                    "(plain batchtopk with --fast-path selects over the whole batch)",
                    cfg.architecture, world.world_size)
