"""Which model(s) read which documents: the options `saediff cache` and `saediff train --live`
share (one definition; both configs inherit it), and loading the models they name.
"""
from __future__ import annotations

from dataclasses import dataclass

from saediff.errors import SaediffError
from saediff.models import LoadedModel, check_same_tokenizer, load_model

SOURCE_REQUIRED = ("base", "layer", "dataset")


@dataclass
class ModelSource:
    base: str | None = None
    """Base (aligned) model: local HF directory or hub name."""
    layer: int | None = None
    """Residual stream after this block (HF hidden_states[layer+1])."""
    dataset: str | None = None
    """Local .jsonl/.json/.parquet/.txt file or a `datasets` hub name (streamed)."""
    base_adapter: str | None = None
    """PEFT adapter directory applied on top of --base."""
    finetuned: str | None = None
    """Fine-tuned model (local dir or hub name); adds a second source `finetuned`."""
    finetuned_adapter: str | None = None
    """PEFT adapter for the fine-tuned side (on --finetuned, or on --base if not given)."""
    text_field: str = "text"
    """Field holding plain text (ignored when --prompt-field is given)."""
    prompt_field: str | None = None
    """Field holding the user prompt: switches to chat mode (chat template + role mask)."""
    response_field: str | None = None
    """Field holding the assistant response (chat mode)."""
    split: str = "train"
    """Dataset split for hub datasets."""
    ctx_len: int = 256
    """Maximum tokens per model input; longer texts are split, longer chats truncated."""
    device: str = "cpu"
    """Torch device (cpu, cuda, cuda:1, ...)."""

    def __post_init__(self) -> None:
        if self.layer is not None and self.layer < 0:
            raise SaediffError(f"layer must be >= 0, got {self.layer}")
        if self.ctx_len < 2:
            raise SaediffError(f"ctx_len must be >= 2, got {self.ctx_len}")
        if self.response_field and not self.prompt_field:
            raise SaediffError("response_field needs prompt_field (chat mode)")
        if self.finetuned_adapter and not self.finetuned:
            self.finetuned = self.base  # base + adapter is the fine-tuned model

    def require_source(self, what: str, need_layer: bool = True) -> None:
        """Refuse a config that names no model, layer or dataset (`what` names the stage;
        `need_layer=False` where `layers` may name the blocks instead)."""
        missing = [n for n in SOURCE_REQUIRED if getattr(self, n) is None
                   and (need_layer or n != "layer")]
        if missing:
            raise SaediffError(f"missing required {what} field(s): "
                               f"{', '.join('--' + m.replace('_', '-') for m in missing)} "
                               "(give them as flags or in the YAML config)")

    @property
    def chat(self) -> bool:
        return self.prompt_field is not None

    @property
    def source_names(self) -> list[str]:
        return ["base", "finetuned"] if self.finetuned else ["base"]


def load_source_models(src: ModelSource, device: str | None = None) -> dict[str, LoadedModel]:
    """{"base": model[, "finetuned": model]}, checked to share a tokenizer and the layer."""
    device = device or src.device
    models = {"base": load_model(src.base, src.base_adapter, device=device)}
    if src.finetuned:
        models["finetuned"] = load_model(src.finetuned, src.finetuned_adapter, device=device)
        check_same_tokenizer(models["base"], models["finetuned"])
    for m in models.values():
        if src.layer is not None:
            m.check_layer(src.layer)
        m.check_ctx_len(src.ctx_len)
    return models
