"""Steer a model with an SAE latent or a direction: a context manager over any forward/generate.

    with saediff.steer(lm, sae, latent=j, clamp=0.0):      # h' = h + (c - f_j(h)) d_j
        lm.generate(...)
    with saediff.steer(lm, sae, latent=j, add=8.0):        # h' = h + a d_j
    with saediff.steer(lm, direction=v, add=4.0):          # h' = h + a v
    with saediff.steer(lm, ablate=r):                      # h' = h - (h . r^) r^

The edit is a forward hook on the output of block `layer` (the residual stream after it, HF
`hidden_states[layer+1]`); the layer comes from the SAE's `hook_name` unless given. Hooks are
removed on exit, also on exceptions. `positions="generated"` edits only tokens that were not
in the prompt: a pre-hook on the model reads the KV cache length of every forward, so during
`generate` the prefill (the prompt) is left alone and each decode step is edited.

Cost: the clamp encodes only the latents it needs (one column of W_enc for a single latent)
for standard (ReLU) and JumpReLU SAEs. A TopK SAE's f_j depends on whether j is in the top k,
which needs the full pre-activation (one d_model x d_sae matmul per token, plus a topk); other
architectures (gated, batch-topk, ...) fall back to the SAE's own encode/decode.
"""
from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from saediff.errors import SaediffError
from saediff.sae import decoder_directions, resolve_layer, sae_architecture, sae_layer
from saediff.steer.positions import PositionTracker, make_hook, watch

ClampValue = float | Sequence[float] | Callable[[torch.Tensor], torch.Tensor]
_FAST = ("standard", "jumprelu", "topk")


# --- model / SAE plumbing ------------------------------------------------------------------

def _resolve(model: Any) -> tuple[nn.Module, nn.ModuleList, int]:
    """(top HF module that receives generate's kwargs, decoder blocks, d_model)."""
    from saediff.models import LoadedModel, _base, _find_layers
    from saediff.steer.tl import is_transformer_lens, resolve_tl

    if isinstance(model, LoadedModel):
        return _base(model.model), model.layers, model.d_model
    if is_transformer_lens(model):  # HookedTransformer / TransformerBridge: TL hook points
        return resolve_tl(model)  # type: ignore[return-value]
    if isinstance(model, nn.Module):
        top = _base(model)
        cfg = top.config
        d = next((getattr(cfg, k) for k in ("hidden_size", "n_embd", "d_model") if hasattr(cfg, k)),
                 None)
        return top, _find_layers(top), int(d)
    raise SaediffError(f"cannot steer a {type(model).__name__}: pass a LoadedModel, a HF model, "
                       "or a TransformerLens HookedTransformer / TransformerBridge")


def check_unique_latents(latents: Sequence[int], what: str = "--latent") -> None:
    """Refuse a repeated latent: it would be edited twice (`--latent 489 489 --clamp 0` moved
    the residual exactly as `--clamp -1.15` on one latent)."""
    seen: set[int] = set()
    dup = sorted({int(j) for j in latents if int(j) in seen or seen.add(int(j))})
    if dup:
        raise SaediffError(f"{what} repeats latent(s) {dup}; give each latent once (a repeat "
                           "would apply its edit twice)")


def check_latents(sae: Any, latents: Sequence[int]) -> None:
    """Every latent index in [0, d_sae), else one line (callers run it before generating)."""
    d_sae = int(sae.cfg.d_sae)
    bad = [int(j) for j in latents if not 0 <= int(j) < d_sae]
    if bad:
        raise SaediffError(f"--latent {' '.join(map(str, bad))} out of range: the SAE has "
                           f"d_sae={d_sae} (latents 0..{d_sae - 1})")


class LatentEncoder:
    """f_J(h) for a few latents J, computing no more of the SAE than needed."""

    def __init__(self, sae: Any, latents: Sequence[int]):
        check_unique_latents(latents, "latent")
        self.sae, self.arch = sae, sae_architecture(sae)
        check_latents(sae, latents)
        self.idx = torch.as_tensor([int(j) for j in latents], dtype=torch.long,
                                   device=sae.W_dec.device)
        self.norm = getattr(sae.cfg, "normalize_activations", "none")
        self.fast = self.arch in _FAST
        self.dtype = sae.W_dec.dtype
        with torch.no_grad():
            self.D = decoder_directions(sae, latents)  # [k, d]
            if self.fast:
                b_in = sae.b_dec.detach() * float(sae.cfg.apply_b_dec_to_input)
                self.W = sae.W_enc.detach()[:, self.idx].contiguous()  # [d, k]
                # (x - b_in) @ W + b_enc == x @ W + const
                self.const = sae.b_enc.detach()[self.idx] - b_in @ self.W
                if self.arch == "jumprelu":
                    self.thr = sae.threshold.detach()[self.idx]
                if self.arch == "topk":
                    self.k = int(sae.cfg.k)
                    self.W_all = sae.W_enc.detach()
                    self.const_all = sae.b_enc.detach() - b_in @ self.W_all
                    self.rescale = (sae.W_dec.detach().norm(dim=-1)
                                    if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False)
                                    else None)

    def _normalise(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """SAE input normalisation; returns (x_in, per-token output scale or None)."""
        if self.norm == "constant_norm_rescale":
            n = x.norm(dim=-1, keepdim=True) / math.sqrt(x.shape[-1])
            return x / n, n
        if self.norm == "layer_norm":
            mu, std = x.mean(dim=-1, keepdim=True), (x - x.mean(dim=-1, keepdim=True)).std(
                dim=-1, keepdim=True)
            return (x - mu) / (std + 1e-5), std
        return x, None

    def to(self, device: torch.device) -> LatentEncoder:
        """Move the sliced weights (not the SAE) to the model's device, once."""
        for name in ("D", "W", "const", "thr", "W_all", "const_all", "rescale"):
            t = getattr(self, name, None)
            if t is not None:
                setattr(self, name, t.to(device))
        return self

    def __call__(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(f_J(h) [..., k], output scale [..., 1] or None), on h's device."""
        if not self.fast:  # the SAE's own encode, on the SAE's device
            x = h.to(device=self.sae.W_dec.device, dtype=self.dtype)
            f = self.sae.encode(x)[..., self.idx]
            scale = self._normalise(x)[1]
            return f.to(h.device), None if scale is None else scale.to(h.device)
        x = h.to(self.dtype)
        x, scale = self._normalise(x)
        if self.arch == "topk":  # membership in the top k needs every latent's pre-activation
            full = x @ self.W_all + self.const_all
            if self.rescale is not None:
                full = full * self.rescale
            pre = full[..., self.idx]
            kth = full.topk(self.k, dim=-1).values[..., -1:]
            return torch.where(pre >= kth, torch.relu(pre), torch.zeros_like(pre)), scale
        pre = x @ self.W + self.const
        if self.arch == "standard":
            return torch.relu(pre), scale
        return torch.relu(pre) * (pre > self.thr), scale


# --- edits: h -> h' on a [..., d_model] tensor ---------------------------------------------

def _as_vector(values: Any, k: int, what: str, device: torch.device, dtype: torch.dtype
               ) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=dtype, device=device).reshape(-1)
    if t.numel() == 1:
        t = t.expand(k)
    if t.numel() != k:
        raise SaediffError(f"{what}: got {t.numel()} values for {k} latents")
    return t


def clamp_edit(sae: Any, latents: Sequence[int], value: ClampValue) -> Callable:
    """h' = h + sum_j (c_j - f_j(h)) d_j (the SAE's error term is kept).

    `value` is a number, one number per latent, or a function of the current activations
    f [..., k] -> target [..., k] (e.g. `lambda f: f` is a no-op, `lambda f: 2 * f` doubles).
    """
    enc = LatentEncoder(sae, latents)
    target = value if callable(value) else _as_vector(value, len(latents), "clamp",
                                                     enc.D.device, enc.D.dtype)

    def edit(h: torch.Tensor) -> torch.Tensor:
        nonlocal target
        if enc.D.device != h.device:
            enc.to(h.device)
            target = target if callable(target) else target.to(h.device)
        f, scale = enc(h)
        c = target(f) if callable(target) else target
        diff = c - f
        delta = diff * enc.D[0] if enc.D.shape[0] == 1 else diff @ enc.D
        if scale is not None:
            delta = delta * scale
        return h + delta.to(h.dtype)

    return edit


def add_edit(vectors: torch.Tensor, coef: Any) -> Callable:
    """h' = h + sum_i a_i v_i."""
    vectors = vectors.reshape(-1, vectors.shape[-1])
    a = _as_vector(coef, vectors.shape[0], "add", vectors.device, vectors.dtype)
    delta = (a[:, None] * vectors).sum(0)
    cache: dict[Any, torch.Tensor] = {}

    def edit(h: torch.Tensor) -> torch.Tensor:
        key = (h.dtype, h.device)
        if key not in cache:
            cache[key] = delta.to(device=h.device, dtype=h.dtype)
        return h + cache[key]

    return edit


def ablate_edit(directions: torch.Tensor) -> Callable:
    """Project out span(directions): h' = h - Q Q^T h (one direction: h - (h.r^) r^)."""
    V = directions.detach().reshape(-1, directions.shape[-1]).float()
    Q = torch.linalg.qr(V.T).Q.T.contiguous()  # orthonormal rows spanning the directions
    cache: dict[Any, torch.Tensor] = {}

    def edit(h: torch.Tensor) -> torch.Tensor:
        key = (h.dtype, h.device)
        if key not in cache:
            cache[key] = Q.to(device=h.device, dtype=h.dtype)
        q = cache[key]
        return h - (h @ q.T) @ q

    return edit


# --- hooks ----------------------------------------------------------------------------------

@contextlib.contextmanager
def steer(model: Any, sae: Any = None, latent: int | Sequence[int] | None = None, *,
          clamp: ClampValue | None = None, add: float | Sequence[float] | None = None,
          ablate: torch.Tensor | bool | None = None, direction: torch.Tensor | None = None,
          layer: int | None = None, positions: str | int = "all") -> Iterator[None]:
    """Steer every forward / `generate` inside the block; hooks are removed on exit.

    Exactly one mode:
      clamp=c   set latent(s) to c keeping the SAE error: h + sum_j (c_j - f_j(h)) d_j.
                c: number, one per latent, or a function f -> target of current activations.
      add=a     h + sum_j a_j d_j (latents' decoder directions) or h + a v (`direction=v`).
      ablate=r  project out direction(s) r [d] or [k, d]; `ablate=True` uses the latents'
                decoder directions.
    latent: one index or a list (several latents at once).
    layer: block whose output is edited; default from the SAE's hook_name.
    positions: "all", "generated" (tokens not in the prompt; KV-cache aware) or an int:
               edit absolute positions >= that index.
    model: a `saediff.models.LoadedModel` (base, merged, or PEFT base+adapter), a HF model, or
           a TransformerLens `HookedTransformer` / `TransformerBridge` (edited at the hook point
           `blocks.{layer}.hook_resid_post`, `saediff.steer.tl`).
    """
    top, layers, d_model = _resolve(model)
    mode = _one_mode(clamp=clamp, add=add, ablate=ablate)
    _check_positions(positions)
    latents = _latent_list(latent)
    needs_sae = mode == "clamp" or (mode == "add" and direction is None) or ablate is True
    _check_inputs(sae, latents, mode, needs_sae, d_model, clamp=clamp, add=add)
    layer = _edit_layer(sae, layer, needs_sae, len(layers))
    edit = _make_edit(mode, sae, latents, d_model, clamp=clamp, add=add, ablate=ablate,
                      direction=direction)
    with _installed(top, layers[layer], edit, positions):
        yield


def _one_mode(**values: Any) -> str:
    modes = [m for m, v in values.items() if v is not None and v is not False]
    if len(modes) != 1:
        raise SaediffError(f"steer: give exactly one of clamp=, add=, ablate= (got {modes or 'none'})")
    return modes[0]


def _check_positions(positions: Any) -> None:
    if positions not in ("all", "generated") and not isinstance(positions, int):
        raise SaediffError(f"steer: positions must be 'all', 'generated' or an int, got {positions!r}")


def _latent_list(latent: Any) -> list[int] | None:
    """One index, a 0-d tensor or a sequence -> a list of ints (None stays None)."""
    if latent is None:
        return None
    if isinstance(latent, numbers.Integral) or (torch.is_tensor(latent) and latent.dim() == 0):
        return [int(latent)]
    return [int(j) for j in latent]


def _check_inputs(sae: Any, latents: list[int] | None, mode: str, needs_sae: bool, d_model: int,
                  **values: Any) -> None:
    """The SAE and latents a mode needs, the SAE's width, and finite coefficients."""
    if needs_sae and (sae is None or not latents):
        raise SaediffError(f"steer: {mode} needs an SAE and latent=")
    if sae is not None and int(sae.cfg.d_in) != d_model:
        raise SaediffError(f"SAE d_in={sae.cfg.d_in} does not match the model's d_model={d_model}")
    for name, v in values.items():
        if v is not None and not callable(v) and not torch.isfinite(torch.as_tensor(v, dtype=torch.float64)).all():
            raise SaediffError(f"steer: {name}={v!r} is not finite; give a finite number")


def _edit_layer(sae: Any, layer: int | None, needs_sae: bool, n_layers: int) -> int:
    """The block whose output is edited: given, or from the SAE's hook_name."""
    if needs_sae:
        layer = resolve_layer(sae, layer, what="layer")
    elif layer is None:
        layer = sae_layer(sae) if sae is not None else None
        if layer is None:
            raise SaediffError("steer: cannot tell the layer (no SAE hook_name); pass layer=")
    if not 0 <= layer < n_layers:
        raise SaediffError(f"layer {layer} out of range: the model has {n_layers} blocks")
    return layer


def _sized(vec: Any, d_model: int, mode: str) -> torch.Tensor:
    vec = torch.as_tensor(vec)
    if vec.shape[-1] != d_model:
        raise SaediffError(f"{mode}: direction has size {vec.shape[-1]}, d_model is {d_model}")
    return vec


def _make_edit(mode: str, sae: Any, latents: list[int] | None, d_model: int, *, clamp: Any,
               add: Any, ablate: Any, direction: Any) -> Callable:
    """The h -> h' function of the mode (`clamp_edit`, `add_edit` or `ablate_edit`)."""
    if mode == "clamp":
        return clamp_edit(sae, latents, clamp)  # type: ignore[arg-type]
    if mode == "add":
        vec = direction if direction is not None else decoder_directions(sae, latents)
        return add_edit(_sized(vec, d_model, "add").detach().float(), add)
    vec = decoder_directions(sae, latents) if ablate is True else ablate
    return ablate_edit(_sized(vec, d_model, "ablate"))


@contextlib.contextmanager
def _installed(top: nn.Module, block: nn.Module, edit: Callable, positions: Any) -> Iterator[None]:
    """The edit as a forward hook on `block` (plus the position tracker on `top` unless every
    position is edited), removed on exit, also on exceptions."""
    tracker = PositionTracker()
    handles = []
    try:
        if positions != "all":
            handles.append(watch(top, tracker))
        handles.append(block.register_forward_hook(make_hook(edit, positions, tracker)))
        yield
    finally:
        for handle in handles:
            handle.remove()
