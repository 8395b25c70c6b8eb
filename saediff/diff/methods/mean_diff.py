"""Difference-in-means direction (Soligo et al.): misaligned − aligned answers, inside the
fine-tuned model (labelled held-out data), via `saediff.diff.directions.diff_in_means`."""
from __future__ import annotations

from saediff.diff.directions import diff_in_means
from saediff.diff.methods.base import Candidate, Method, MethodInputs


class MeanDiffMethod(Method):
    name = "mean_diff"

    def candidates(self, inputs: MethodInputs, top: int = 5) -> list[Candidate]:
        inputs.need(self.name, "resid", "labels")
        y = inputs.labels.bool()  # type: ignore[union-attr]
        v = diff_in_means(inputs.resid[y], inputs.resid[~y])  # type: ignore[index]
        return [Candidate(self.name, "misaligned − aligned", v, float(v.norm()),
                          {"n_pos": int(y.sum()), "n_neg": int((~y).sum())})]
