"""`saediff models import FILE.gguf --out DIR`: a GGUF checkpoint to a plain HF directory."""
from __future__ import annotations

import argparse
import time
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="import model checkpoints (GGUF -> HF safetensors)",
                       description=__doc__)
    msub = p.add_subparsers(dest="cmd", required=True)
    i = msub.add_parser("import", help="dequantise a .gguf file (fp32) into a HF model directory "
                        "(config, safetensors, tokenizer, chat template)")
    i.add_argument("gguf_file", metavar="FILE.gguf", help="the GGUF checkpoint")
    i.add_argument("--out", required=True, help="output directory (built as DIR.tmp, then renamed)")
    i.set_defaults(func=_import)


def _import(a: argparse.Namespace) -> int:
    import torch

    from saediff.gguf import check_gguf_file, import_gguf
    from saediff.io import check_writable_dir

    check_gguf_file(a.gguf_file)  # bad input fails before any slow import
    check_writable_dir(Path(a.out).expanduser().parent, "--out parent")
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
    t0 = time.time()
    out = import_gguf(a.gguf_file, a.out)
    print(f"imported {a.gguf_file} -> {out} ({time.time() - t0:.0f} s)")
    return 0
