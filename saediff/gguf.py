"""GGUF in, HF out: dequantise a `.gguf` checkpoint into a plain HF safetensors directory.

transformers reads GGUF (`from_pretrained(dir, gguf_file=name)`) and dequantises every tensor
to the requested dtype, but the loaded model still carries a GGUF quantizer, so
`save_pretrained` refuses until `model.hf_quantizer` is cleared and the config has no
`quantization_config`. We do that once and write config, weights, tokenizer and chat template
to a directory that AutoModelForCausalLM / AutoTokenizer / PEFT / TransformerLens load like any
other. `load_model("FILE.gguf")` imports into a content-keyed cache dir on first use.

The `gguf` package is an optional extra (`pip install -e ".[real]"`), imported lazily.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

from saediff.errors import SaediffError
from saediff.io import atomic_path, write_json

log = logging.getLogger(__name__)

INSTALL_HINT = 'pip install -e ".[real]"'


def saediff_home() -> Path:
    """User cache dir for imported models: `$SAEDIFF_HOME`, else `~/.cache/saediff`."""
    env = os.environ.get("SAEDIFF_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "saediff"


def require_gguf() -> Any:
    """The `gguf` module, or one-line SaediffError saying how to install it."""
    try:
        import gguf  # noqa: F401 - optional extra
    except ImportError as exc:
        raise SaediffError(f"reading GGUF files needs the 'gguf' package: {INSTALL_HINT}") from exc
    return gguf


def is_gguf_path(name_or_path: str | Path) -> bool:
    return str(name_or_path).lower().endswith(".gguf")


def check_gguf_file(gguf_file: str | Path) -> Path:
    """The path as a Path, if it is an existing GGUF file (magic bytes checked)."""
    p = Path(gguf_file).expanduser()
    if not p.is_file():
        raise SaediffError(f"{p}: no such GGUF file; give the path of an existing .gguf file")
    with open(p, "rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise SaediffError(f"{p}: not a GGUF file (bad magic {magic!r}); give a .gguf checkpoint")
    return p


def check_gguf_structure(p: Path) -> None:
    """The header parses and every tensor's data lies inside the file: a truncated copy or a
    header that lies about its counts is named as such (not a struct.error, nor blamed on
    the architecture)."""
    gguf = require_gguf()
    size = p.stat().st_size
    try:
        reader = gguf.GGUFReader(str(p), "r")
    except Exception as exc:  # noqa: BLE001 - any parse failure of this file is bad input
        raise SaediffError(f"{p}: truncated or corrupt GGUF ({size} bytes; the header or tensor "
                           f"table does not parse: {type(exc).__name__}: {str(exc)[:120]}); "
                           "download or copy the file again") from exc
    end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > size:
        raise SaediffError(f"{p}: truncated GGUF: its tensors need {end} bytes but the file has "
                           f"{size}; download or copy the file again")


def _file_digest(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def _strip_quantizer(model: Any) -> None:
    """What `save_pretrained` checks: no quantizer and no `quantization_config` on the config."""
    model.hf_quantizer = None
    for attr in ("is_quantized", "quantization_method"):
        if hasattr(model, attr):
            try:
                setattr(model, attr, None if attr == "quantization_method" else False)
            except AttributeError:  # a read-only property in some versions
                pass
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")


def import_gguf(gguf_file: str | Path, out_dir: str | Path) -> Path:
    """Dequantise `gguf_file` (fp32) and write a plain HF model directory at `out_dir`.

    The directory is built as `out_dir.tmp` and renamed on success (an existing `out_dir` is
    replaced); it holds config.json, model.safetensors, the tokenizer with its chat template
    and `saediff_import.json` (source file, its sha256 prefix).
    """
    p = check_gguf_file(gguf_file)
    check_gguf_structure(p)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise SaediffError(f"--out {out} exists and is not a directory; pick a directory path")
    out.parent.mkdir(parents=True, exist_ok=True)
    log.info("dequantising %s (fp32) ...", p)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name,
                                                     dtype=torch.float32, local_files_only=True)
        tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name, local_files_only=True)
    except (ValueError, KeyError, OSError) as exc:
        raise SaediffError(f"{p}: transformers cannot read this GGUF ({exc}); only "
                           "architectures transformers' GGUF loader supports can be imported") from exc
    _strip_quantizer(model)
    # Drop the GGUF file name: the saved directory is a plain checkpoint.
    model.config._name_or_path = str(out)
    with atomic_path(out) as tmp:
        tmp.mkdir()
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        write_json(tmp / "saediff_import.json", {"source": str(p.resolve()), "sha256_16": _file_digest(p),
                                                 "dtype": "float32"})
    log.debug("wrote %s", out)
    return out


def cached_import(gguf_file: str | Path) -> Path:
    """The HF directory imported from `gguf_file`, importing it on first use.

    Keyed by the file's content hash under `saediff_home()/gguf/`, so an edited file is
    re-imported and a moved one is not.
    """
    p = check_gguf_file(gguf_file)
    out = saediff_home() / "gguf" / f"{p.stem}-{_file_digest(p)}"
    if (out / "config.json").is_file() and (out / "saediff_import.json").is_file():
        return out
    return import_gguf(p, out)
