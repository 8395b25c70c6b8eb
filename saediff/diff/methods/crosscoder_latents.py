"""Crosscoder latents (Minder et al. 2025): fine-tuned-only latents by relative decoder norm,
with Latent Scaling to drop false exclusives; ranked by their share of the difference."""
from __future__ import annotations

import torch

from saediff.diff.methods.base import Candidate, Method, MethodInputs, orient

EXCLUSIVE = 0.7
"""Relative decoder norm above which a latent counts as fine-tuned-leaning."""
FALSE_RATIO = 0.5
"""β_base / β_ft above which a 'fine-tuned-only' latent is really in the base too."""


class CrosscoderMethod(Method):
    name = "crosscoder"

    @torch.no_grad()
    def candidates(self, inputs: MethodInputs, top: int = 5) -> list[Candidate]:
        from saediff.sae import load_sae
        from saediff.sae.crosscoder import latent_scaling

        inputs.need(self.name, "crosscoder", "x_base", "x_ft")
        cc = load_sae(inputs.crosscoder)  # type: ignore[arg-type]
        xb, xf = inputs.x_base, inputs.x_ft
        chunk = 8192
        f = torch.cat([cc.encode(xb[i: i + chunk], xf[i: i + chunk])  # type: ignore[index]
                       for i in range(0, xb.shape[0], chunk)])  # type: ignore[union-attr]
        delta = (cc.W_dec[1] - cc.W_dec[0]).detach()                    # [n, d]
        # the latent's share of the fine-tune's change: mean activation x ||d_ft − d_base||
        score = f.mean(0) * delta.norm(dim=-1)
        rel = cc.relative_norms()
        pool = torch.nonzero(rel > EXCLUSIVE).flatten()
        ratio = torch.full_like(rel, float("nan"))
        if len(pool):
            pairs = [(xb[i: i + chunk], xf[i: i + chunk])  # type: ignore[index]
                     for i in range(0, xb.shape[0], chunk)]  # type: ignore[union-attr]
            ratio[pool] = latent_scaling(cc, pairs, pool)["ratio"]
            keep = pool[~(ratio[pool] > FALSE_RATIO)]
        else:
            keep = pool
        if len(keep) == 0:  # nothing exclusive survives: fall back to the largest changes
            keep = torch.arange(cc.cfg.d_sae)
        order = keep[score[keep].argsort(descending=True)][:top]
        return [Candidate(self.name, f"latent {int(j)}", orient(delta[j].float(),
                                                                 inputs.mean_shift),
                          float(score[j]), {"latent": int(j), "relative_norm": float(rel[j]),
                                            "beta_ratio": float(ratio[j]),
                                            "fire_rate": float((f[:, j] > 0).float().mean())})
                for j in order]
