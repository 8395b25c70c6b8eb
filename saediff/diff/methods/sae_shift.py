"""SAE latents ranked by activation shift (Wang et al.), on the paired cache rows, with the
same statistics as `saediff diff` (`rank_latents`)."""
from __future__ import annotations

import torch

from saediff.diff.methods.base import Candidate, Method, MethodInputs


@torch.no_grad()
def encode_rows(sae: object, x: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """sae.encode over row chunks -> [N, d_sae]."""
    return torch.cat([sae.encode(x[i: i + chunk]).detach().float()  # type: ignore[attr-defined]
                      for i in range(0, x.shape[0], chunk)])


class SAEShiftMethod(Method):
    name = "sae"

    def candidates(self, inputs: MethodInputs, top: int = 5) -> list[Candidate]:
        from saediff.diff.differ import rank_latents
        from saediff.sae import decoder_directions, load_sae

        inputs.need(self.name, "sae", "x_base", "x_ft")
        sae = load_sae(inputs.sae)  # type: ignore[arg-type]
        fb, ff = encode_rows(sae, inputs.x_base), encode_rows(sae, inputs.x_ft)  # type: ignore
        seq = torch.arange(fb.shape[0]) // 64  # bootstrap groups of 64 rows (CI only)
        rows = rank_latents(fb, ff, seq, direction="up", n_boot=50)[:top]
        out = []
        for r in rows:
            j = int(r["latent"])
            out.append(Candidate(self.name, f"latent {j}", decoder_directions(sae, [j])[0].float(),
                                 float(r["mean_shift"]), {"latent": j}))
        return out
