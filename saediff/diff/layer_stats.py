"""Per-layer directions, norms and cosines with prompt-bootstrap CIs (for `saediff layers`).

Every quantity is a function of group-weighted sums: with weights w [B, G] over prompts,
D_i = (w·(S_ft_i − S_base)) / (w·n) and M_m = (w·S⁺_m)/(w·n⁺) − (w·S⁻_m)/(w·n⁻). The point
estimate is w = 1; bootstrap replicates draw w from a multinomial over prompts. Replicates in
which one label side is empty give NaN and are left out of the percentiles.
"""
from __future__ import annotations

import math
from typing import Any

import torch

CHUNK = 50  # bootstrap replicates per matrix product (memory: CHUNK·L·d per direction)


def _dirs(sums: Any, w: torch.Tensor, ft: list[str], labelled: bool) -> dict[str, torch.Tensor]:
    """{'D:<ft>' / 'M:<model>': [B, L, d]} for group weights w [B, G]."""
    G, L, d = sums.total["base"].shape
    B = w.shape[0]
    flat = {k: v.reshape(G, L * d) for k, v in sums.total.items()}
    n = (w @ sums.count).clamp_min(1e-300)[:, None]
    out = {f"D:{f}": ((w @ (flat[f] - flat["base"])) / n).reshape(B, L, d) for f in ft}
    if labelled:
        n1 = (w @ sums.label_count[1])[:, None]
        n0 = (w @ sums.label_count[0])[:, None]
        bad = ((n1 == 0) | (n0 == 0)).reshape(B, 1, 1)
        for m in ["base", *ft]:
            pos = w @ sums.label[(m, 1)].reshape(G, L * d) / n1.clamp_min(1e-300)
            neg = w @ sums.label[(m, 0)].reshape(G, L * d) / n0.clamp_min(1e-300)
            v = (pos - neg).reshape(B, L, d)
            out[f"M:{m}"] = torch.where(bad, torch.full_like(v, math.nan), v)
    return out


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine over the last axis; NaN where either vector is zero (e.g. a layer below the
    only block an adapter edits: no direction there, so no agreement to report)."""
    na, nb = a.norm(dim=-1), b.norm(dim=-1)
    c = (a * b).sum(-1) / (na * nb).clamp_min(1e-30)
    return torch.where((na < 1e-9) | (nb < 1e-9), torch.full_like(c, math.nan), c)


def increments(D: torch.Tensor, layers: list[int]) -> torch.Tensor:
    """D[..., L, d] -> what block L adds: D[L] − D[L−1] where L−1 is scanned (D[0] at block 0,
    assuming equal embeddings); NaN where the previous block was not scanned."""
    out = torch.full_like(D, math.nan)
    for k, layer in enumerate(layers):
        if layer == 0:
            out[..., k, :] = D[..., k, :]
        elif k > 0 and layers[k - 1] == layer - 1:
            out[..., k, :] = D[..., k, :] - D[..., k - 1, :]
    return out


def _series(dv: dict[str, torch.Tensor], ft: list[str], layers: list[int],
            labelled: bool) -> dict[tuple[str, ...], torch.Tensor]:
    """Every reported per-layer quantity as [B, L]."""
    s: dict[tuple[str, ...], torch.Tensor] = {}
    for f in ft:
        D = dv[f"D:{f}"]
        s[("norm_D", f)] = D.norm(dim=-1)
        s[("norm_inc", f)] = increments(D, layers).norm(dim=-1)
        if labelled:
            s[("cos_DM", f)] = _cos(D, dv[f"M:{f}"])
            s[("cos_Mbase", f)] = _cos(dv["M:base"], dv[f"M:{f}"])
    if labelled:
        for m in ["base", *ft]:
            s[("norm_M", m)] = dv[f"M:{m}"].norm(dim=-1)
    for i, a in enumerate(ft):
        for b in ft[i + 1:]:
            s[("cos_D", a, b)] = _cos(dv[f"D:{a}"], dv[f"D:{b}"])
            if labelled:
                s[("cos_M", a, b)] = _cos(dv[f"M:{a}"], dv[f"M:{b}"])
    return s


def bootstrap(sums: Any, ft: list[str], layers: list[int], labelled: bool, n_boot: int,
              level: float, seed: int) -> dict[tuple[str, ...], dict[str, list[float | None]]]:
    """{quantity: {value, ci_low, ci_high}} per layer."""
    G = sums.count.numel()
    point = _series(_dirs(sums, torch.ones(1, G, dtype=torch.float64), ft, labelled), ft,
                    layers, labelled)
    gen = torch.Generator().manual_seed(seed)
    reps: dict[tuple[str, ...], list[torch.Tensor]] = {k: [] for k in point}
    for start in range(0, n_boot, CHUNK):
        b = min(CHUNK, n_boot - start)
        idx = torch.randint(0, G, (b, G), generator=gen)
        w = torch.zeros(b, G, dtype=torch.float64).scatter_add_(
            1, idx, torch.ones(b, G, dtype=torch.float64))
        for k, v in _series(_dirs(sums, w, ft, labelled), ft, layers, labelled).items():
            reps[k].append(v)
    alpha = (1 - level) / 2
    q = torch.tensor([alpha, 1 - alpha], dtype=torch.float64)
    out = {}
    for k, v in point.items():
        r = torch.cat(reps[k])
        lo, hi = torch.nanquantile(r, q, dim=0)
        out[k] = {"value": _list(v[0]), "ci_low": _list(lo), "ci_high": _list(hi)}
    return out


def _list(t: torch.Tensor) -> list[float | None]:
    return [None if not math.isfinite(float(x)) else round(float(x), 6) for x in t]


def _matrix(v: torch.Tensor) -> list[list[float | None]]:
    """Layer × layer cosines of one direction's per-layer vectors [L, d]."""
    return [_list(row) for row in _cos(v[:, None, :], v[None, :, :])]


def summarise(sums: Any, layers: list[int], ft: list[str], lora: dict[str, Any], n_boot: int,
              level: float, seed: int) -> dict[str, Any]:
    """The content of layers.json (+ `vectors`: the point-estimate directions [L, d])."""
    G, L, d = sums.total["base"].shape
    labelled = bool(sums.label_count[0].sum() > 0 and sums.label_count[1].sum() > 0)
    dv = {k: v[0] for k, v in _dirs(sums, torch.ones(1, G, dtype=torch.float64), ft,
                                   labelled).items()}
    st = bootstrap(sums, ft, layers, labelled, n_boot, level, seed)
    base_norm = sums.norm_sum["base"] / sums.count.sum()
    out: dict[str, Any] = {"layers": layers, "labelled": labelled, "finetunes": {},
                           "chance_abs_cos": round(math.sqrt(2 / (math.pi * d)), 6),
                           "base_resid_norm": _list(base_norm), "across": []}
    for f in ft:
        D = dv[f"D:{f}"]
        e: dict[str, Any] = {"ft_minus_base_norm": st[("norm_D", f)],
                             "ft_minus_base_rel_norm": _list(D.norm(dim=-1) / base_norm),
                             "increment_norm": st[("norm_inc", f)],
                             "layer_cosines": _matrix(D)}
        if labelled:
            e["cos_ft_minus_base_vs_misaligned"] = st[("cos_DM", f)]
            e["cos_base_vs_own_misaligned"] = st[("cos_Mbase", f)]
            e["misaligned_layer_cosines"] = _matrix(dv[f"M:{f}"])
        e["lora_b"] = None if lora.get(f) is None else [
            [{"name": x.name, "norm": round(float(x.vector.norm()), 6),
              "abs_cos_ft_minus_base": round(abs(float(_cos(x.vector.double(), D[k]))), 6),
              **({"abs_cos_misaligned": round(abs(float(_cos(x.vector.double(), dv[f"M:{f}"][k]))), 6)}
                 if labelled else {})} for x in per]
            for k, per in enumerate(lora[f])]
        out["finetunes"][f] = e
    if labelled:
        out["misaligned_minus_aligned"] = {m: {"norm": st[("norm_M", m)]} for m in ["base", *ft]}
    for i, a in enumerate(ft):
        for b in ft[i + 1:]:
            row = {"a": a, "b": b, "cos_ft_minus_base": st[("cos_D", a, b)]}
            if labelled:
                row["cos_misaligned_minus_aligned"] = st[("cos_M", a, b)]
            out["across"].append(row)
    out["vectors"] = {k.replace(":", "/"): v.float().contiguous() for k, v in dv.items()}
    return out
