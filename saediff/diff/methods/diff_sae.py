"""Diff-SAE (the toolkit's "SAE difference"): an SAE trained on fine-tuned − base activations
of the same tokens (`saediff train --input difference`); latents ranked by mean activation."""
from __future__ import annotations

from saediff.diff.methods.base import Candidate, Method, MethodInputs, orient
from saediff.diff.methods.sae_shift import encode_rows


class DiffSAEMethod(Method):
    name = "diff_sae"

    def candidates(self, inputs: MethodInputs, top: int = 5) -> list[Candidate]:
        from saediff.sae import decoder_directions, load_sae

        inputs.need(self.name, "diff_sae", "x_base", "x_ft")
        sae = load_sae(inputs.diff_sae)  # type: ignore[arg-type]
        f = encode_rows(sae, inputs.x_ft - inputs.x_base)  # type: ignore[operator]
        mean = f.mean(0)
        order = mean.argsort(descending=True)[:top]
        return [Candidate(self.name, f"latent {int(j)}",
                          orient(decoder_directions(sae, [int(j)])[0].float(), inputs.mean_shift),
                          float(mean[j]), {"latent": int(j),
                                           "fire_rate": float((f[:, j] > 0).float().mean())})
                for j in order]
