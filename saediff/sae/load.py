"""One SAE loader, one answer to "which layer does this SAE read", one fit check.

Every stage that uses a trained SAE (diff, steer, evals, demo) goes through here, so a
checkpoint is read, located and validated the same way everywhere.
"""
from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from saediff.errors import SaediffError
from saediff.io import check_complete

log = logging.getLogger(__name__)

_NOT_RESID = ("hook_resid_mid", "mlp_out", "attn_out", "hook_z", "hook_q", "hook_k", "hook_v")


def load_sae(path: str | Path, device: str = "cpu") -> Any:
    """The SAE saved in a run directory: a SAELens SAE, or a saediff crosscoder; or a SAELens
    pretrained SAE named `sae_lens:RELEASE/SAE_ID` (`saediff.sae.pretrained`).

    Raw-activation input (any normalisation factor was folded into the weights at save time).
    """
    from saediff.sae.pretrained import is_pretrained_ref, load_pretrained

    if is_pretrained_ref(path):
        return load_pretrained(str(path), device)
    path = Path(path)
    check_complete(path, "SAE run")
    if not (path / "cfg.json").is_file():
        subs = sorted(p.name for p in path.iterdir() if (p / "cfg.json").is_file()) \
            if path.is_dir() else []
        hint = f"; sweep runs inside: {subs}" if subs else ""
        raise FileNotFoundError(f"{path} holds no saved SAE (cfg.json + weights .safetensors)"
                                f"{hint}")
    try:
        cfg = json.loads((path / "cfg.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SaediffError(f"{path / 'cfg.json'} is not valid JSON ({exc}); "
                           "point at a run directory written by `saediff train`") from exc
    if cfg.get("architecture") == "crosscoder":
        from saediff.sae.crosscoder import Crosscoder

        cc = Crosscoder.load(path, device=device)
        check_sae_weights(cc, path)
        return cc
    weights = path / "sae_weights.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{path} holds no sae_weights.safetensors")
    from sae_lens import SAE
    from safetensors import SafetensorError

    try:
        check_sae_shapes(weights, cfg)
        sae = SAE.load_from_disk(path, device=device)
    except SafetensorError as exc:
        raise SaediffError(f"{weights} is not a readable safetensors file ({exc}); "
                           "retrain or copy the run directory again") from exc
    check_sae_weights(sae, path)
    return sae


# --- what the loader checks (docs/faults.md) --------------------------------------------------

# tensor -> its shape in terms of cfg.json's sizes (SAELens names; absent tensors are skipped)
_SHAPES = {"W_enc": ("d_in", "d_sae"), "W_dec": ("d_sae", "d_in"), "b_enc": ("d_sae",),
           "b_dec": ("d_in",), "threshold": ("d_sae",), "log_threshold": ("d_sae",)}


def check_sae_shapes(weights: Path, cfg: dict[str, Any]) -> None:
    """cfg.json's d_in/d_sae are positive ints and match the weight shapes (read from the
    safetensors header, before anything is loaded)."""
    from safetensors import safe_open

    sizes = {}
    for key in ("d_in", "d_sae"):
        v = cfg.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise SaediffError(f"{weights.parent / 'cfg.json'}: {key} must be a positive integer, "
                               f"got {v!r}; fix cfg.json or retrain")
        sizes[key] = v
    with safe_open(str(weights), framework="pt") as f:
        for name in f.keys():
            want = _SHAPES.get(name)
            got = tuple(f.get_slice(name).get_shape())
            if want is not None and got != tuple(sizes[k] for k in want):
                shown = ", ".join(f"{k}={sizes[k]}" for k in want)
                raise SaediffError(f"{weights}: {name} has shape {list(got)} but cfg.json says "
                                   f"{shown}; the weights and cfg.json come from different SAEs")


def check_sae_weights(sae: Any, path: str | Path) -> None:
    """Every weight is finite: one NaN in a decoder row makes a TopK latent win every token."""
    for name, t in sae.state_dict().items():
        if not t.is_floating_point():
            continue
        bad = ~torch.isfinite(t)
        if bad.any():
            first = [int(i) for i in bad.nonzero()[0]]
            raise SaediffError(f"SAE {path}: {name} holds {int(bad.sum())} NaN/inf value(s) "
                               f"(first at {first}); the checkpoint is corrupt, retrain it or "
                               "restore the file")


SAE_KINDS = ("activations", "difference", "crosscoder")


def sae_input_kind(sae: Any) -> str:
    """What the SAE encodes: one model's `activations`, fine-tuned − base `difference`s, or
    both models together (`crosscoder`), from its class and cfg.json's `saediff_input`."""
    if sae.__class__.__name__ == "Crosscoder":
        return "crosscoder"
    meta = getattr(sae.cfg, "metadata", None)
    kind = getattr(meta, "saediff_input", None) if meta is not None else None
    return "difference" if kind == "difference" else "activations"


def require_activation_sae(sae: Any, path: str | Path, command: str) -> None:
    """`diff` and `steer` encode one model's residual stream: refuse other kinds of SAE."""
    kind = sae_input_kind(sae)
    if kind == "difference":
        raise SaediffError(f"SAE {path} was trained on fine-tuned - base differences "
                           f"(saediff_input: difference); `{command}` encodes one model's "
                           "activations: train with --input activations, or rank it with "
                           "`saediff compare` (method diff_sae)")
    if kind == "crosscoder":
        raise SaediffError(f"SAE {path} is a crosscoder (it encodes base and fine-tuned "
                           f"activations together); `{command}` needs an SAE on one model's "
                           "activations, or rank crosscoder latents with `saediff compare` "
                           "(method crosscoder)")


def sae_layer(sae: Any) -> int | None:
    """The block whose residual output the SAE reads (HF `hidden_states[L+1]`), or None.

    From the metadata's `hook_name` (`blocks.L.hook_resid_post`; `resid_pre` of L is the output
    of L-1) and/or `layer`; if both are present they must agree.
    """
    meta = getattr(sae.cfg, "metadata", None)
    get = (lambda k: meta.get(k)) if meta is not None else (lambda k: None)
    hook = get("hook_name") or getattr(sae.cfg, "hook_name", None)
    from_hook = None
    if hook:
        if any(bad in str(hook) for bad in _NOT_RESID):
            raise SaediffError(f"SAE hook {hook!r} is not the residual stream after a block; "
                               "saediff works on hook_resid_post SAEs")
        m = re.search(r"(?:blocks|layers|h)\.(\d+)", str(hook))
        if m:
            from_hook = int(m.group(1)) - (1 if "resid_pre" in str(hook) else 0)
            if from_hook < 0:
                raise SaediffError(f"SAE hook {hook!r} reads the embeddings, not a block output")
    meta_layer = get("layer")
    if meta_layer is None:
        meta_layer = get("hook_layer")
    if meta_layer is not None and from_hook is not None and int(meta_layer) != from_hook:
        raise SaediffError(f"SAE metadata disagrees with itself: layer {meta_layer} but hook "
                           f"{hook!r}; fix cfg.json's metadata")
    if meta_layer is not None:
        return int(meta_layer)
    return from_hook


def resolve_layer(sae: Any, layer: int | None, what: str = "--layer") -> int:
    """The layer to use: the SAE's own, checked against an explicit `layer` if one is given."""
    sl = sae_layer(sae) if sae is not None else None
    if layer is None:
        if sl is None:
            raise SaediffError(f"the SAE records no layer; pass {what}")
        return sl
    if sl is not None and sl != layer:
        raise SaediffError(f"{what} {layer} does not match the SAE's layer {sl}; use {what} {sl} "
                           f"or an SAE trained on layer {layer}")
    if sl is None:
        log.warning("SAE records no layer or hook name; trusting %s %d", what, layer)
    return layer


def check_sae(sae: Any, lm: Any, layer: int) -> None:
    """Refuse an SAE that does not fit the model (`LoadedModel`) and layer."""
    lm.check_layer(layer)
    d_in = int(sae.cfg.d_in)
    if d_in != lm.d_model:
        raise SaediffError(f"SAE d_in is {d_in} but {lm.name} has d_model {lm.d_model}: "
                           "this SAE was trained on a different model")
    resolve_layer(sae, layer)


def sae_architecture(sae: Any) -> str:
    """SAELens architecture name; refuses SAEs that do not read the residual stream."""
    arch = sae.cfg.architecture() if hasattr(sae.cfg, "architecture") else "?"
    if getattr(sae.cfg, "reshape_activations", "none") == "hook_z":
        raise SaediffError("this SAE reads attention hook_z, not the residual stream")
    return arch


def decoder_directions(sae: Any, latents: Sequence[int]) -> torch.Tensor:
    """d_j as the SAE decodes it: W_dec[j] (divided by its norm for TopK SAEs that rescale
    activations by decoder norm), so that f_j = 1 adds exactly d_j to the reconstruction."""
    idx = torch.as_tensor(list(latents), dtype=torch.long, device=sae.W_dec.device)
    d = sae.W_dec.detach()[idx]
    if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False):
        d = d / d.norm(dim=-1, keepdim=True)
    return d
