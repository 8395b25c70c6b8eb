"""Candidate 'misalignment directions' in one layer's residual stream, and how they compare.

(a) difference in means of residuals (misaligned minus aligned answers, inside one model);
(b) LoRA B vectors of a PEFT adapter module that writes into that layer's residual stream;
(c) SAE decoder directions. Pairwise cosines and the fraction of a vector's squared norm that
lies in the span of the top-k decoder directions.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from saediff.errors import SaediffError

# Modules whose output is added to the residual stream (per architecture family).
RESIDUAL_WRITERS = ("down_proj", "o_proj", "c_proj", "out_proj", "dense_4h_to_h", "dense", "fc2",
                    "w2", "wo")
_LORA_KEY = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.(.+?)\.lora_B(?:\.[^.]+)?\.weight$")
_LORA_A = "lora_A"


@dataclass
class Direction:
    """A named vector in the residual stream (d_model)."""

    name: str
    """Display name, e.g. 'diff-in-means (labels)', 'lora_B mlp.down_proj', 'latent 17'."""
    kind: str
    """One of 'diff_means', 'lora_b', 'decoder'."""
    vector: torch.Tensor
    """[d_model] float32 (not normalised)."""

    def unit(self) -> torch.Tensor:
        return self.vector / self.vector.norm().clamp_min(1e-12)


def diff_in_means(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """mean(pos) - mean(neg) over rows ([N, d] each) -> [d]."""
    if pos.shape[0] == 0 or neg.shape[0] == 0:
        raise SaediffError("difference in means needs tokens on both sides")
    return (pos.double().mean(0) - neg.double().mean(0)).float()


def cosine_matrix(vectors: list[torch.Tensor]) -> torch.Tensor:
    """Signed pairwise cosine similarities [n, n]."""
    m = torch.stack([v.double() / v.double().norm().clamp_min(1e-12) for v in vectors])
    return (m @ m.T).float()


def span_explained(v: torch.Tensor, basis: torch.Tensor) -> float:
    """||P v||^2 / ||v||^2 with P the orthogonal projector onto the row span of basis [k, d]."""
    v = v.double().flatten()
    if basis.numel() == 0:
        return 0.0
    q, r = torch.linalg.qr(basis.double().T)  # [d, k]
    keep = r.diagonal().abs() > 1e-10 * r.diagonal().abs().max().clamp_min(1e-30)
    q = q[:, keep]
    proj = q @ (q.T @ v)
    return float((proj.norm() ** 2 / (v.norm() ** 2).clamp_min(1e-30)).item())


def _adapter_scale(cfg: dict[str, Any], module: str) -> float:
    r = int(cfg.get("rank_pattern", {}).get(module, cfg.get("r", 1)))
    alpha = float(cfg.get("alpha_pattern", {}).get(module, cfg.get("lora_alpha", r)))
    return alpha / (r ** 0.5) if cfg.get("use_rslora") else alpha / r


def lora_b_vectors(adapter_dir: str | Path, layer: int, d_model: int, max_per_module: int = 2
                   ) -> list[Direction]:
    """The vectors a PEFT LoRA adapter writes into block `layer`'s residual stream.

    For each residual-writing module of block `layer` (MLP down-projection, attention output):
    rank 1 -> its B column as stored; rank r > 1 -> the top left singular vectors of
    scale * B @ A (scaled by their singular values), at most `max_per_module` of them.
    """
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{adapter_dir}: no adapter_model.safetensors (PEFT adapter dir)")
    cfg_path = adapter_dir / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    state = load_file(str(weights))
    out: list[Direction] = []
    for key in sorted(state):
        m = _LORA_KEY.search(key)
        if not m or int(m.group(1)) != layer:
            continue
        module = m.group(2)
        if module.split(".")[-1] not in RESIDUAL_WRITERS:
            continue
        b = state[key].float()
        if b.shape[0] != d_model:
            continue
        a = state.get(key.replace("lora_B", _LORA_A))
        if b.shape[1] == 1 or a is None:
            for k in range(min(b.shape[1], max_per_module)):
                suffix = "" if b.shape[1] == 1 else f"[{k}]"
                out.append(Direction(f"lora_B {module}{suffix}", "lora_b", b[:, k].clone()))
            continue
        delta = _adapter_scale(cfg, module) * (b @ a.float())
        u, s, _ = torch.linalg.svd(delta, full_matrices=False)
        for k in range(min(max_per_module, len(s))):
            out.append(Direction(f"lora_B {module} sv{k + 1}", "lora_b", u[:, k] * s[k]))
    return out


@torch.no_grad()
def logit_tokens(lm: Any, vector: torch.Tensor, k: int = 10) -> dict[str, list[tuple[str, float]]]:
    """Tokens whose logits a residual direction promotes / suppresses most (logit lens).

    The final norm's elementwise weight is applied when it has one (RMSNorm/LayerNorm gain).
    """
    model = lm.model
    emb = model.get_output_embeddings()
    if emb is None:
        return {"promoted": [], "suppressed": []}
    v = vector.to(emb.weight.device, emb.weight.dtype)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(base, "model", None) or getattr(base, "transformer", None)
    norm = None
    for name in ("norm", "ln_f", "final_layernorm", "final_layer_norm"):
        norm = getattr(inner, name, None) if inner is not None else None
        if norm is not None:
            break
    w = getattr(norm, "weight", None)
    if w is not None and w.shape == v.shape:
        v = v * w
    logits = (emb.weight @ v).float().cpu()
    tok = lm.tokenizer
    n = min(k, logits.numel())
    top = torch.topk(logits, n)
    bot = torch.topk(-logits, n)

    def name(i: int) -> str:
        return tok.convert_ids_to_tokens(int(i)) or str(int(i))

    return {"promoted": [(name(i), float(x)) for x, i in zip(top.values, top.indices)],
            "suppressed": [(name(i), float(-x)) for x, i in zip(bot.values, bot.indices)]}


def compare(directions: list[Direction], decoder: torch.Tensor | None = None,
            ks: tuple[int, ...] = (1, 5, 10, 20)) -> dict[str, Any]:
    """Cosine table of all directions, plus span-explained fractions of the non-decoder ones.

    `decoder` [K, d] are the top-ranked latents' decoder rows in rank order.
    """
    names = [d.name for d in directions]
    cos = cosine_matrix([d.vector for d in directions]) if directions else torch.zeros(0, 0)
    span: dict[str, dict[str, float]] = {}
    if decoder is not None and decoder.shape[0] > 0:
        for d in directions:
            if d.kind == "decoder":
                continue
            span[d.name] = {str(k): span_explained(d.vector, decoder[:k])
                            for k in ks if k <= decoder.shape[0]}
    return {"names": names, "kinds": [d.kind for d in directions],
            "cosines": [[round(float(x), 6) for x in row] for row in cos],
            "span_explained": span}
