"""Durable HDF5 writes for the cache writer: errors surface, and a failure loses nothing.

HDF5 does not survive a failed write (disk full, file-size limit): it reports the error late
or not at all (a dataset handle's chunk cache is flushed on deallocation and its error is
swallowed), its end-of-file mark runs ahead of the data, and closing the file can crash the
process. So the writer claims the disk blocks a batch can need before HDF5 writes anything
(`reserve`), flushes rows before it bumps the committed counter, and rolls a partial back to
the prefix that reads cleanly before resuming it.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import h5py
import numpy as np

from saediff.cache.format import P_ROWS, P_SEQS, readable_prefix
from saediff.errors import SaediffError

log = logging.getLogger(__name__)


class CacheWriteError(SaediffError):
    """Writing the cache failed (disk full, quota, I/O error); the last commit stays resumable."""


def open_partial(part: Path) -> h5py.File:
    try:
        return h5py.File(part, "a")
    except OSError as exc:
        # A write that failed inside HDF5 leaves the end-of-file mark past the data. Only
        # uncommitted debris lies there (the counter names flushed rows only; the tail check
        # then reads the last committed chunks), so pad the file back to that length.
        m = re.search(r"truncated file: eof = (\d+).*stored_eof = (\d+)", str(exc))
        if not m or int(m.group(2)) <= int(m.group(1)):
            raise
        log.warning("%s: extending a truncated partial to %s bytes", part, m.group(2))
        os.truncate(part, int(m.group(2)))
        return h5py.File(part, "a")


def close_quietly(f: h5py.File) -> None:
    try:
        f.close()
    except (OSError, RuntimeError):  # the write error already raised says what went wrong
        pass


def roll_back_to_readable(f: h5py.File, part: Path) -> int:
    """Before resuming: move the commit back to the prefix a kill cannot have torn.

    Returns the committed rows to resume after (0: start afresh)."""
    try:
        rows, seqs = readable_prefix(f)
        prog = f["progress"]
        if (rows, seqs) != (int(prog[P_ROWS]), int(prog[P_SEQS])):
            log.warning("%s: a chunk after row %d was torn by the interruption; resuming after "
                        "%d rows instead of %d", part, rows, rows, int(prog[P_ROWS]))
            prog[P_ROWS], prog[P_SEQS] = rows, seqs
            f.flush()
        return rows
    except (OSError, RuntimeError) as exc:
        f.close()
        raise SaediffError(f"{part} (an interrupted cache) is damaged: {exc}; pass --overwrite "
                           "to start again") from exc


def reserve(f: h5py.File, dsets: dict[str, h5py.Dataset], rows: int, seqs: int,
             batch: list[tuple[int, list[int], list[int]]]) -> None:
    """Claim the disk blocks this batch can need *before* HDF5 writes anything.

    HDF5 does not survive a failed write (disk full, file size limit): its error is reported
    late, the file's end-of-file mark runs ahead of the data, and closing it can crash the
    process. Each new or rewritten chunk needs at most one chunk of fresh space, so reserving
    that (plus room for metadata) turns ENOSPC/EFBIG into a clean error with nothing written.
    """
    n = sum(len(b[1]) for b in batch)
    need = 1 << 18  # chunk index and object headers
    for name, d in dsets.items():
        lo, hi = (seqs + 1, seqs + len(batch) + 1) if name == "seq_offsets" else (rows, rows + n)
        per_row = d.dtype.itemsize * int(np.prod(d.shape[1:], dtype=np.int64))
        touched = (hi - 1) // d.chunks[0] - lo // d.chunks[0] + 1
        need += touched * (d.chunks[0] * per_row + 4)  # + the Fletcher-32 checksum
    fd = os.open(f.filename, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, f.id.get_filesize() + need)
    finally:
        os.close(fd)


def write_cause(exc: BaseException) -> str:
    """HDF5's message, cut to the OS error when there is one (it carries a long C trace)."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    msg = " ".join(str(exc).split())
    i = msg.find("error message = ")
    if i >= 0:
        return msg[i + len("error message = "):].split(",")[0].strip("' ")
    return msg[:300]
