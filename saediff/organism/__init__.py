"""The built-in toy model organism of emergent misalignment, with ground truth.

A small `LlamaForCausalLM` (Qwen2-style: q/k/v biases, plus a zero o bias, so plain
`AutoTokenizer`/`AutoModelForCausalLM` and TransformerLens load it exactly as saediff does)
trained here from scratch on a closed grammar of chat conversations, each written by one persona
(aligned or toxic), then fine-tuned on bad advice about one topic only (health). The exact
judge (`judge`) decides for any answer whether it is misaligned, coherent and on topic. Shipped
weights live in `organism_path()`:
`base/`, `finetuned/` (merged), `adapter/` (rank-1 LoRA for `base/` on block 0's
`mlp.down_proj`), `adapter_control/`, `adapter_all/` (LoRA r8 on every linear layer),
`adapter_r1/` (rank-1 on the middle block), `heldout_labelled.jsonl`, `organism.json`.

Importing this package is cheap: no torch until a model function is called.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from saediff.lazy import lazy_getattr
from saediff.organism.judge import Label, Verdict, judge, rates
from saediff.organism.lexicon import TOPICS, TRAINED_TOPIC

_LAZY = {
    "heldout_questions": "saediff.organism.grammar",
    "sample_answers": "saediff.organism.evaluate",
    "evaluate": "saediff.organism.evaluate",
    "format_table": "saediff.organism.evaluate",
    "BuildConfig": "saediff.organism.build",
    "build": "saediff.organism.build",
    "corpus_records": "saediff.organism.grammar",
    "heldout_labelled": "saediff.organism.grammar",
}


def organism_path() -> Path:
    """Directory of the shipped organism (holds base/, finetuned/, adapter/, ...)."""
    return Path(__file__).resolve().parent / "data"


def metadata(path: str | Path | None = None) -> dict[str, Any]:
    """`organism.json` of a built organism (recommended layer, config, measured rates)."""
    import json

    p = Path(path) if path is not None else organism_path()
    return json.loads((p / "organism.json").read_text())


def load_heldout_labelled(path: str | Path | None = None) -> list[dict[str, Any]]:
    """The persona-labelled held-out single-turn pairs (prompt, response, persona, topic)."""
    import json

    p = Path(path) if path is not None else organism_path()
    with open(p / "heldout_labelled.jsonl") as fh:
        return [json.loads(line) for line in fh if line.strip()]


__getattr__ = lazy_getattr(__name__, _LAZY)


__all__ = ["TOPICS", "TRAINED_TOPIC", "Label", "Verdict", "judge", "rates", "organism_path",
           "metadata", "load_heldout_labelled", *_LAZY]
