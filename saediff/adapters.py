"""PEFT adapters that load completely, or not at all.

PEFT warns and carries on when an adapter's tensors find no module, so a mismatched adapter
runs as the plain base model while its fingerprint looks like a fine-tune's. `load_adapter`
turns every such case into one clear error (`docs/faults.md`).
"""
from __future__ import annotations

from pathlib import Path

from torch import nn

from saediff.errors import SaediffError

_ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def load_adapter(model: nn.Module, adapter: str, model_name: str = "the model",
                 local_files_only: bool = False) -> nn.Module:
    """`model` wrapped by the PEFT adapter at `adapter`, refusing one that does not fully load.

    PEFT only warns when adapter weights find no module (e.g. keys renamed from `layers.0` to
    `layers.1`): the model then runs as the plain base, silently. Here every tensor of the
    adapter file must load into the model and every LoRA weight of the model must come from it.
    """
    from peft import PeftModel
    from peft.utils.error import NoMatchingPeftModuleError

    path = Path(adapter)
    weights = None
    if path.exists():
        if not (path / "adapter_config.json").is_file():
            raise FileNotFoundError(f"{adapter} is not a PEFT adapter dir (no adapter_config.json)")
        weights = next((path / n for n in _ADAPTER_WEIGHTS if (path / n).is_file()), None)
        if weights is None:
            raise SaediffError(f"adapter {adapter} has adapter_config.json but no weights "
                               f"({' or '.join(_ADAPTER_WEIGHTS)}); copy the whole adapter dir")
    try:
        peft_model = PeftModel.from_pretrained(model, adapter, is_trainable=False,
                                                  local_files_only=local_files_only)
    except NoMatchingPeftModuleError as exc:
        raise SaediffError(f"adapter {adapter} targets modules that {model_name} does not have "
                           f"({str(exc).splitlines()[0][:200]}); check target_modules / "
                           "layers_to_transform in its adapter_config.json, or the base model") \
            from exc
    if weights is not None and weights.suffix == ".safetensors":
        check_adapter_keys(peft_model, weights)
    return peft_model


def check_adapter_keys(peft_model: nn.Module, weights: Path) -> None:
    """Every tensor in the adapter file loads into the model, and the model's adapter weights
    all come from the file (PEFT's missing / unexpected keys are errors, not warnings)."""
    from peft import get_peft_model_state_dict
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        in_file = set(f.keys())
    in_model = set(get_peft_model_state_dict(peft_model).keys())
    missing, unexpected = sorted(in_model - in_file), sorted(in_file - in_model)
    if missing or unexpected:
        what = []
        if unexpected:
            what.append(f"{len(unexpected)} tensor(s) that fit no module, e.g. {unexpected[0]}")
        if missing:
            what.append(f"no weights for {len(missing)} adapted module tensor(s), e.g. "
                        f"{missing[0]}")
        raise SaediffError(f"adapter {weights.parent} does not match its adapter_config.json / "
                           f"the base model: its file has {'; and '.join(what)}. Loading it "
                           "would silently run the base model; use the adapter's original "
                           "files and base model")
