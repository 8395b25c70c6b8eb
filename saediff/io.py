"""Atomic writes: a file appears under its final name complete, or not at all.

Every file saediff writes goes through `atomic_path` (or one of the helpers built on it), so a
killed or failing run never leaves a half-written or stale file under a final name.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from saediff.errors import SaediffError


def _nan_to_none(obj: Any) -> Any:
    """NaN (e.g. a rate with an empty denominator) is not JSON: write it as null."""
    if isinstance(obj, float) and obj != obj:
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
    tmp = path.with_name(path.name + ".tmp")
    _remove(tmp)
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


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
    write_text(path, json.dumps(_nan_to_none(obj), indent=indent) + "\n")


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> None:
    """Atomic JSON-lines write, one object per line; NaN becomes null."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(_nan_to_none(r)) + "\n")


def check_writable_dir(path: str | Path, what: str = "--out") -> Path:
    """Create `path` if needed and prove it writable *before* any model runs (exit 2 otherwise)."""
    p = Path(path)
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
