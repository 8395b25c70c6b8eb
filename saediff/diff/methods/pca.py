"""PCA of activation differences (fine-tuned − base, same tokens): top components."""
from __future__ import annotations

import torch

from saediff.diff.methods.base import Candidate, Method, MethodInputs, orient


def pca_directions(diff: torch.Tensor, k: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k principal axes [k, d] (unit rows) and explained-variance shares [k] of diff [N, d].

    Centred: a constant shift is the mean-difference method's business, PCA finds how the
    difference *varies* across tokens.
    """
    x = diff.double()
    x = x - x.mean(0)
    cov = x.T @ x / max(1, x.shape[0] - 1)
    evals, evecs = torch.linalg.eigh(cov)
    order = evals.flip(0).clamp_min(0)
    share = order / order.sum().clamp_min(1e-30)
    return evecs.flip(1).T[:k].float(), share[:k].float()


class PCAMethod(Method):
    name = "pca"

    def candidates(self, inputs: MethodInputs, top: int = 5) -> list[Candidate]:
        inputs.need(self.name, "x_base", "x_ft")
        diff = inputs.x_ft - inputs.x_base  # type: ignore[operator]
        axes, share = pca_directions(diff, top)
        ref = inputs.mean_shift
        # orient each PC along the mean shift, or (if orthogonal to it) along its heavier tail
        out = []
        for i, (v, s) in enumerate(zip(axes, share)):
            proj = diff @ v
            tail = proj - proj.mean()
            v = orient(v, ref) if abs(float(v @ ref)) > 1e-6 * float(ref.norm()) \
                else (v if float((tail ** 3).mean()) >= 0 else -v)
            out.append(Candidate(self.name, f"PC{i + 1}", v, float(s),
                                 {"explained_variance": float(s)}))
        return out
