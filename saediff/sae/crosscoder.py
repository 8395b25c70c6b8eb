"""A two-model crosscoder (Lindsey et al. 2024; BatchTopK as in Minder et al. 2025).

One encoder reads both models' residuals of the same token, one decoder per model:

    f = BatchTopK(x_base W_enc[0] + x_ft W_enc[1] + b_enc)        (latents [d_sae])
    x_hat_m = f W_dec[m] + b_dec[m]                                (m = 0 base, 1 fine-tuned)

A latent whose fine-tuned decoder is long and base decoder short "exists only in the
fine-tune" (relative decoder norm near 1). BatchTopK keeps the k x batch largest
norm-weighted activations of a batch while training; at inference a single threshold learned
during training replaces the batch (so a token's code does not depend on its batch-mates).
Saved as `cfg.json` (`"architecture": "crosscoder"`) + `crosscoder.safetensors`, raw-activation
scale (any training scale folded in); `saediff.sae.load_sae` dispatches here.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from saediff.errors import SaediffError

log = logging.getLogger(__name__)

MODELS = ("base", "finetuned")
WEIGHTS = "crosscoder.safetensors"


@dataclass
class CrosscoderCfg:
    """Shape and metadata of a crosscoder (what cfg.json holds)."""

    d_in: int
    d_sae: int
    k: float = 16
    """Mean active latents per token (BatchTopK over the batch)."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """hook_name, layer, model names, training facts (as for SAELens SAEs)."""

    def architecture(self) -> str:
        return "crosscoder"


def _model_index(model: str | int) -> int:
    if isinstance(model, int) and model in (0, 1):
        return model
    if model in MODELS:
        return MODELS.index(model)
    raise SaediffError(f"crosscoder model must be one of {MODELS}, got {model!r}")


class Crosscoder(nn.Module):
    """Crosscoder over (base, fine-tuned) residuals; see the module docstring."""

    def __init__(self, cfg: CrosscoderCfg, seed: int = 0):
        super().__init__()
        self.cfg = cfg
        d, n = cfg.d_in, cfg.d_sae
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(n, d, generator=g)
        w = w / w.norm(dim=-1, keepdim=True) * 0.1
        # Decoders start equal and the encoder tied to them, so no latent starts out exclusive.
        self.W_dec = nn.Parameter(torch.stack([w.clone(), w.clone()]))       # [2, n, d]
        self.W_enc = nn.Parameter(self.W_dec.detach().transpose(1, 2).clone())  # [2, d, n]
        self.b_enc = nn.Parameter(torch.zeros(n))
        self.b_dec = nn.Parameter(torch.zeros(2, d))
        self.register_buffer("threshold", torch.zeros(()))

    # -- encode / decode -------------------------------------------------------------------
    def _check(self, x: torch.Tensor, what: str) -> None:
        if x.shape[-1] != self.cfg.d_in:
            raise SaediffError(f"crosscoder {what}: width {x.shape[-1]}, expected d_in "
                               f"{self.cfg.d_in}")

    def hidden_pre(self, x_base: torch.Tensor, x_ft: torch.Tensor) -> torch.Tensor:
        """Encoder outputs [..., d_sae] before the ReLU (the auxiliary loss ranks dead latents
        by these)."""
        self._check(x_base, "x_base")
        self._check(x_ft, "x_ft")
        return ((x_base - self.b_dec[0]) @ self.W_enc[0]
                + (x_ft - self.b_dec[1]) @ self.W_enc[1] + self.b_enc)

    def pre_acts(self, x_base: torch.Tensor, x_ft: torch.Tensor) -> torch.Tensor:
        """ReLU pre-activations [..., d_sae] before the sparsity selection."""
        return torch.relu(self.hidden_pre(x_base, x_ft))

    def decoder_norms(self) -> torch.Tensor:
        """[2, d_sae]: ||d_base,j||, ||d_ft,j||."""
        return self.W_dec.norm(dim=-1)

    def encode(self, x_base: torch.Tensor, x_ft: torch.Tensor, batch_topk: bool = False
               ) -> torch.Tensor:
        """Latent activations [..., d_sae] of paired residuals.

        `batch_topk` selects the k x rows largest norm-weighted activations of this batch (the
        training rule); otherwise the learned threshold decides per token.
        """
        return self.select(self.pre_acts(x_base, x_ft), batch_topk)

    def select(self, f: torch.Tensor, batch_topk: bool = False, dp: Any = None) -> torch.Tensor:
        """The sparsity rule of `encode` applied to ReLU pre-activations `f`.

        `dp` (training under torchrun, f = this rank's share of the batch): BatchTopK keeps
        the k x rows largest scores of the *global* batch (`train.ddp.DataParallel`).
        """
        score = f * self.decoder_norms().sum(0)
        if batch_topk and dp is not None and dp.active:
            flat = score.reshape(-1)
            n_keep = max(1, int(self.cfg.k * score[..., 0].numel() * dp.world.world_size))
            cut = dp.kth_largest(flat.topk(min(n_keep, flat.numel()), sorted=False).values,
                                 n_keep)
            return f * (score >= cut)
        if batch_topk:
            flat = score.reshape(-1)
            n_keep = min(flat.numel(), max(1, int(self.cfg.k * score[..., 0].numel())))
            keep = torch.zeros_like(flat, dtype=torch.bool)
            keep[flat.topk(n_keep).indices] = True
            return f * keep.view_as(f)
        return f * (score > self.threshold)

    def decode(self, f: torch.Tensor, model: str | int) -> torch.Tensor:
        """Reconstruction of one model's residual ("base" or "finetuned") [..., d_in]."""
        m = _model_index(model)
        return f @ self.W_dec[m] + self.b_dec[m]

    def forward(self, x_base: torch.Tensor, x_ft: torch.Tensor, batch_topk: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        f = self.encode(x_base, x_ft, batch_topk)
        return f, self.decode(f, 0), self.decode(f, 1)

    # -- diffing metrics -------------------------------------------------------------------
    @torch.no_grad()
    def relative_norms(self) -> torch.Tensor:
        """[d_sae] in [0, 1]: 0 base-only, 0.5 shared, 1 fine-tuned-only.

        r = ||d_ft|| / (||d_base|| + ||d_ft||); equals the reference's
        ½[(||d_ft|| − ||d_b||)/max + 1] at 0, ½ and 1 and orders latents the same way.
        """
        n = self.decoder_norms()
        return n[1] / n.sum(0).clamp_min(1e-12)

    @torch.no_grad()
    def decoder_cosines(self) -> torch.Tensor:
        """[d_sae]: cosine between each latent's base and fine-tuned decoder rows."""
        a, b = self.W_dec[0], self.W_dec[1]
        return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-12)

    # -- save / load -----------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """cfg.json + crosscoder.safetensors into directory `path` (each file atomically)."""
        from safetensors.torch import save_file

        from saediff.io import atomic_path, write_json

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        with atomic_path(path / WEIGHTS) as tmp:
            save_file(tensors, str(tmp))
        write_json(path / "cfg.json", {"architecture": "crosscoder", **asdict(self.cfg)})
        return path

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> Crosscoder:
        from safetensors.torch import load_file

        path = Path(path)
        raw = json.loads((path / "cfg.json").read_text())
        if raw.get("architecture") != "crosscoder":
            raise SaediffError(f"{path / 'cfg.json'} is not a crosscoder (architecture "
                               f"{raw.get('architecture')!r})")
        weights = path / WEIGHTS
        if not weights.is_file():
            raise FileNotFoundError(f"{path} holds no {WEIGHTS}")
        try:
            cfg = CrosscoderCfg(d_in=int(raw["d_in"]), d_sae=int(raw["d_sae"]),
                                k=float(raw.get("k", 16)), metadata=raw.get("metadata") or {})
        except KeyError as exc:
            raise SaediffError(f"{path / 'cfg.json'} lacks {exc}; retrain the crosscoder") from exc
        cc = cls(cfg)
        state = load_file(str(weights))
        try:
            cc.load_state_dict(state)
        except RuntimeError as exc:
            raise SaediffError(f"{weights} does not match its cfg.json ({exc})") from exc
        return cc.to(device).eval()


@torch.no_grad()
def latent_scaling(cc: Crosscoder, pairs: Any, latents: torch.Tensor | None = None,
                   model: str | int = "finetuned") -> dict[str, torch.Tensor]:
    """Latent Scaling (Minder et al. 2025): how much of each latent is really in each model.

    For latent j with decoder d = d_{model,j}, fit each model m's target
    y_m = x_m − x_hat_m + f_j d_{m,j} (its reconstruction error plus the latent's own
    contribution) by β f_j d:  β_m = dᵀ Σ f_j y_m / (||d||² Σ f_j²).
    A true fine-tuned-only latent has β_base ≈ 0; a "false exclusive" — its direction is in
    the base activations too, only not decoded there — has β_base ≈ β_ft, so the ratio
    ν = β_base / β_ft flags it. `pairs` is an iterable of (x_base [B, d], x_ft [B, d]).
    Returns {"beta_base", "beta_ft", "ratio"} [len(latents)].
    """
    m_dir = _model_index(model)
    idx = torch.arange(cc.cfg.d_sae) if latents is None else torch.as_tensor(latents).long()
    d = cc.W_dec[m_dir, idx].double()                                    # [K, d]
    num = torch.zeros(2, len(idx), dtype=torch.float64)
    den = torch.zeros(len(idx), dtype=torch.float64)
    for xb, xf in pairs:
        xb, xf = xb.to(cc.W_dec.device).float(), xf.to(cc.W_dec.device).float()
        f = cc.encode(xb, xf)
        fk = f[:, idx].double()                                         # [B, K]
        den += (fk ** 2).sum(0)
        for m, x in enumerate((xb, xf)):
            err = (x - cc.decode(f, m)).double()                         # [B, d]
            # Σ_t f_j (err_t · d) + Σ_t f_j² (d_{m,j} · d)
            own = (cc.W_dec[m, idx].double() * d).sum(-1)
            num[m] += ((fk.T @ err) * d).sum(-1) + (fk ** 2).sum(0) * own
    dn = (d ** 2).sum(-1) * den.clamp_min(1e-30)
    beta = num / dn
    return {"beta_base": beta[0].float(), "beta_ft": beta[1].float(),
            "ratio": (beta[0] / beta[1].where(beta[1].abs() > 1e-12,
                                              torch.full_like(beta[1], 1e-12))).float()}
