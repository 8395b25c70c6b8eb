"""torch.distributed as launched by `torchrun`: rank, world size, one process group per run.

Without torchrun (no RANK/WORLD_SIZE in the environment) everything here is a no-op and a run
is a single process, as before. Backend: nccl when the run uses CUDA, gloo otherwise.
"""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as tdist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dist:
    """This process's place in the run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def current() -> Dist:
    """The rank/world size of the initialised group, or of the torchrun environment, or 0/1."""
    if tdist.is_available() and tdist.is_initialized():
        return Dist(tdist.get_rank(), tdist.get_world_size(),
                    int(os.environ.get("LOCAL_RANK", tdist.get_rank())))
    if launched_by_torchrun():
        return Dist(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                    int(os.environ.get("LOCAL_RANK", 0)))
    return Dist()


@contextlib.contextmanager
def process_group(device: str = "cpu") -> Iterator[Dist]:
    """Initialise the process group under torchrun (gloo on CPU, nccl on CUDA) for the
    duration of a run and destroy it afterwards; yields this process's `Dist`."""
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1 or tdist.is_initialized():
        yield current()
        return
    backend = "nccl" if device.startswith("cuda") and torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    tdist.init_process_group(backend=backend)
    try:
        d = current()
        log.info("rank %d of %d (%s)", d.rank, d.world_size, backend)
        yield d
    finally:
        tdist.destroy_process_group()


def barrier() -> None:
    if tdist.is_available() and tdist.is_initialized():
        tdist.barrier()


def rank_device(device: str) -> str:
    """`cuda` -> `cuda:<local rank>` under torchrun, so each rank takes its own GPU."""
    d = current()
    if device == "cuda" and d.active:
        return f"cuda:{d.local_rank}"
    return device
