"""Atomic writes: a file appears under its final name complete, or not at all.

Every file saediff writes goes through `atomic_path` (or one of the helpers built on it), so a
killed or failing run never leaves a half-written or stale file under a final name. Temp names
are unique per process and call, so two writers never delete each other's temp files.

A command's output *directory* is guarded too: `output_lock` lets one process write an `--out`
at a time (a second gets one line, exit 2), and `staged_outputs` builds all of a command's files
in a staging folder and moves them in together under an `.saediff-incomplete` marker, which
`check_complete` (every reader) refuses: a killed run never leaves a directory that reads as
complete but mixes two runs.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from saediff.errors import SaediffError


def _nan_to_none(obj: Any) -> Any:
    """NaN and ±inf (e.g. a rate with an empty denominator) are not JSON: write them as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_to_none(v) for v in obj]
    return obj


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path`; on success rename it over `path`, else remove it.

    Works for files and directories (a directory target is replaced whole).
    """
    path = Path(path)
    tmp = temp_sibling(path)
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            old = temp_sibling(path, "old")  # the old dir leaves in one rename, then is removed
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def promote(done: str | Path, path: str | Path) -> Path:
    """Move a file that a writer has finished under a temporary name (e.g. the cache's
    `.partial`) to its final name in one rename: readers see the old file or the new one."""
    os.replace(done, path)
    return Path(path)


@contextlib.contextmanager
def staged_dir(path: str | Path) -> Iterator[Path]:
    """Yield a new empty directory beside `path`; on success it replaces `path` whole (in one
    rename, the old one removed after), on failure it is removed and `path` is untouched."""
    with atomic_path(path) as tmp:
        tmp.mkdir(parents=True)
        yield tmp


def temp_sibling(path: str | Path, kind: str = "tmp") -> Path:
    """A hidden sibling name unique to this process and call (`.NAME.PID.RANDOM.tmp`)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.{kind}")


def json_dumps(obj: Any, indent: int | None = None, default: Any = None) -> str:
    """Strict JSON text: NaN/inf become null (never bare `NaN`, which no JSON parser reads)."""
    return json.dumps(_nan_to_none(obj), indent=indent, allow_nan=False, default=default)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists() or p.is_symlink():
        p.unlink()


def write_text(path: str | Path, text: str) -> None:
    """Atomic text write (UTF-8)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, obj: Any, indent: int | None = 1) -> None:
    """Atomic JSON write; NaN becomes null."""
    write_text(path, json_dumps(obj, indent=indent) + "\n")


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> None:
    """Atomic JSON-lines write, one object per line; NaN becomes null."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json_dumps(r) + "\n")


def append_jsonl(path: str | Path, row: dict[str, Any]) -> None:
    """Append one JSON line (NaN becomes null) in a single write call, so a killed run
    leaves whole lines only, up to its last checkpoint's (a resume cuts the log back)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json_dumps(row) + "\n").encode("utf-8"))
    finally:
        os.close(fd)


def check_writable_dir(path: str | Path, what: str = "--out") -> Path:
    """Create `path` if needed and prove it writable *before* any model runs (exit 2 otherwise)."""
    p = Path(path)
    _refuse_dangling(p, what)
    if p.exists() and not p.is_dir():
        raise SaediffError(f"{what} {p} exists and is not a directory; pick a directory path")
    try:
        p.mkdir(parents=True, exist_ok=True)
        # a unique probe: several ranks may check the same directory at once
        with tempfile.NamedTemporaryFile(dir=p, prefix=".saediff-write-test-"):
            pass
    except OSError as exc:
        raise SaediffError(f"{what} {p} is not writable ({exc.strerror or exc}); "
                           "choose a writable directory") from exc
    return p


def check_writable_file(path: str | Path, what: str = "--out") -> Path:
    """The parent of `path` exists (or can be made) and is writable; `path` is not a directory."""
    p = Path(path)
    _refuse_dangling(p, what)
    if p.is_dir():
        raise SaediffError(f"{what} {p} is a directory; give a file path")
    check_writable_dir(p.parent if str(p.parent) else Path("."), what=f"{what} directory")
    return p


def safe_child(root: str | Path, name: str, what: str) -> Path:
    """`root/name`, refusing names that would leave `root` (`..`, absolute paths, separators)."""
    root_r = Path(root).resolve()
    p = (root_r / name).resolve()
    if p.parent != root_r or name in ("", ".", ".."):
        raise SaediffError(f"{what} {name!r} would leave {root}; use a plain name "
                           "without '/', '..' or an absolute path")
    return p


def _refuse_dangling(p: Path, what: str) -> None:
    # mkdir/open on a dangling symlink fail with a bare "File exists" / "No such file"
    if p.is_symlink() and not p.exists():
        raise SaediffError(f"{what} {p} is a symlink to {os.readlink(p)}, which does not exist; "
                           "remove the link or create its target")


# --- one writer per output -----------------------------------------------------------------------

_HELD: dict[str, int] = {}  # lock paths this process holds -> depth (re-entrant in one process)


def lock_path(target: str | Path, directory: bool = True) -> Path:
    """The lock file of an output: `DIR/.saediff.lock` inside a directory, `FILE.lock` beside
    a file."""
    return Path(os.path.abspath(target)) / ".saediff.lock" if directory \
        else Path(os.path.abspath(target) + ".lock")


@contextlib.contextmanager
def output_lock(target: str | Path, what: str = "--out", reentrant: bool = True,
                directory: bool = True) -> Iterator[None]:
    """Hold an exclusive lock on output `target` for the block; a second process gets one
    line, exit 2.

    An `flock` on `lock_path(target)` (released by the kernel when the process dies, so a killed
    writer never blocks the next one); the file holds the holder's pid and is removed on release.
    A `directory` target is created (and checked writable) first. Re-entrant within one process
    unless `reentrant=False`.
    """
    if directory:
        check_writable_dir(target, what)
    lock = lock_path(target, directory)
    key = str(lock)
    if reentrant and _HELD.get(key):
        _HELD[key] += 1
        try:
            yield
        finally:
            _HELD[key] -= 1
        return
    fh = _acquire(lock, target, what)
    _HELD[key] = 1
    try:
        yield
    finally:
        _HELD.pop(key, None)
        try:  # unlink while still holding it: a waiter then retries on a fresh file
            if os.path.samefile(lock, fh.name):
                lock.unlink()
        except OSError:
            pass
        fh.close()  # closing releases the flock


def _acquire(lock: Path, target: str | Path, what: str) -> Any:
    while True:
        try:
            lock.parent.mkdir(parents=True, exist_ok=True)
            fh = open(lock, "a+")
        except OSError as exc:  # e.g. a file where a parent directory should be
            raise SaediffError(f"{what} {target} is not writable ({exc.strerror or exc}: "
                               f"{lock.parent}); choose a writable location") from exc
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "?"
            fh.close()
            raise SaediffError(f"another writer (pid {holder}) is already writing {target}; "
                               f"wait for it to finish or choose another {what}") from None
        try:  # the previous holder may have unlinked the file between our open and flock
            same = os.fstat(fh.fileno()).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            fh.seek(0)
            fh.truncate()
            fh.write(str(os.getpid()))
            fh.flush()
            return fh
        fh.close()


# --- output directories that never mix two runs ------------------------------------------------

INCOMPLETE = ".saediff-incomplete"
STAGING = ".saediff-staging-"


def _remove_dead_stages(out: Path) -> None:
    """Staging folders of writers that died (their pid is gone) are debris."""
    for d in out.glob(STAGING + "*"):
        pid = d.name[len(STAGING):].split("-")[0]
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except (ValueError, PermissionError):
            pass


def check_complete(path: str | Path, what: str = "directory") -> None:
    """Refuse a directory a command is still writing (or was killed while writing)."""
    marker = Path(path) / INCOMPLETE
    if marker.exists():
        try:
            info = json.loads(marker.read_text())
        except (OSError, ValueError):
            info = {}
        cmd = info.get("command", "saediff")
        raise SaediffError(f"{what} {path} is incomplete: a `{cmd}` run was killed or is still "
                           f"writing it (marker {marker.name}); rerun `{cmd}` with that --out")


def mark_incomplete(path: str | Path, command: str) -> None:
    """Put the incomplete marker into directory `path` (readers refuse it until `mark_complete`)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    write_json(path / INCOMPLETE, {"command": command, "pid": os.getpid()})


def mark_complete(path: str | Path) -> None:
    (Path(path) / INCOMPLETE).unlink(missing_ok=True)


@contextlib.contextmanager
def incomplete_until_done(path: str | Path, command: str) -> Iterator[Path]:
    """Mark `path` incomplete for the block (the marker stays if the block fails or is killed)."""
    mark_incomplete(path, command)
    yield Path(path)
    mark_complete(path)


@contextlib.contextmanager
def staged_outputs(out: str | Path, owned: Iterable[str], command: str) -> Iterator[Path]:
    """Yield an empty staging folder; on success its files become `out`'s outputs together.

    Every file of the run is first written into `out/.saediff-staging-PID-...` (the old outputs
    stay whole meanwhile, also if this run dies); then, under the incomplete marker, `owned`
    outputs of an older run that this run did not write are removed and the staged files are
    renamed into place. Files in `out` that the command does not own are left alone.
    """
    out = check_writable_dir(out)
    _remove_dead_stages(out)
    stage = out / f"{STAGING}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    stage.mkdir()
    try:
        yield stage
        with incomplete_until_done(out, command):
            new = {p.name for p in stage.iterdir()}
            for stale in set(owned) - new:
                _remove(out / stale)
            for name in sorted(new):
                if (out / name).is_dir() and not (out / name).is_symlink():
                    shutil.rmtree(out / name)
                os.replace(stage / name, out / name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
