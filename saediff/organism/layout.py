"""The toy organism's architecture: a Qwen2ForCausalLM, saved in the identical Llama layout
(see `build`'s module docstring for why)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from saediff.io import atomic_path, write_text


def new_model(cfg: Any, tok: Any) -> Any:
    """The untrained base of `cfg` (a `build.BuildConfig`), a Qwen2ForCausalLM (saved in the
    Llama layout, `to_llama_layout`)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(cfg.seed)
    mcfg = Qwen2Config(vocab_size=len(tok), hidden_size=cfg.d_model, intermediate_size=cfg.d_mlp,
                       num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                       num_key_value_heads=cfg.n_heads, max_position_embeddings=512,
                       tie_word_embeddings=True, pad_token_id=tok.pad_token_id,
                       eos_token_id=tok.eos_token_id, bos_token_id=None)
    model = Qwen2ForCausalLM(mcfg)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.bos_token_id = None
    return model


def to_llama_layout(model_dir: str | Path) -> bool:
    """Rewrite a saved Qwen2ForCausalLM dir in place as the identical LlamaForCausalLM.

    Qwen2 is Llama with q/k/v biases and no o bias: the config becomes `model_type: llama` with
    `attention_bias: true` (Llama's flag covers q/k/v/o alike) and every block gets a zero
    `self_attn.o_proj.bias`; the logits are bit-for-bit those of the Qwen2 model. The weights are
    written first, then the config (each atomically): a dir killed in between still loads as
    Qwen2 (with an unused zero bias). Idempotent; returns False when there was nothing to do.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    from transformers import LlamaConfig

    model_dir = Path(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    if cfg.get("model_type") == "llama":
        return False
    if cfg.get("model_type") != "qwen2":
        raise ValueError(f"{model_dir}: expected a qwen2 checkpoint, got {cfg.get('model_type')!r}")
    if cfg.get("use_sliding_window"):
        raise ValueError(f"{model_dir}: sliding-window attention has no Llama equivalent")
    weights = model_dir / "model.safetensors"
    with safe_open(weights, "pt") as fh:
        metadata = fh.metadata() or {}
    sd = load_file(weights)
    for k in [k for k in sd if k.endswith("self_attn.o_proj.weight")]:
        sd.setdefault(k[: -len("weight")] + "bias", torch.zeros(sd[k].shape[0], dtype=sd[k].dtype))
    with atomic_path(weights) as tmp:
        save_file(sd, str(tmp), metadata={**metadata, "format": "pt"})
        os.chmod(tmp, weights.stat().st_mode & 0o777)  # safetensors writes 0600
    known = set(LlamaConfig().to_dict())
    new = {k: v for k, v in cfg.items() if k in known or k == "rope_parameters"}
    new.update(model_type="llama", architectures=["LlamaForCausalLM"], attention_bias=True,
               mlp_bias=False)
    write_text(model_dir / "config.json", json.dumps(new, indent=2, sort_keys=True) + "\n")
    return True
