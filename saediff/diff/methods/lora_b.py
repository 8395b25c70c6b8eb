"""The LoRA B vector(s) writing into the layer (Turner et al.), via `lora_b_vectors`."""
from __future__ import annotations

from saediff.diff.directions import lora_b_vectors
from saediff.diff.methods.base import Candidate, Method, MethodInputs, orient
from saediff.errors import SaediffError


class LoraBMethod(Method):
    name = "lora_b"

    def candidates(self, inputs: MethodInputs, top: int = 5) -> list[Candidate]:
        inputs.need(self.name, "adapter")
        dirs = lora_b_vectors(inputs.adapter, inputs.layer, inputs.d_model,  # type: ignore
                              max_per_module=top)
        if not dirs:
            raise SaediffError(f"adapter {inputs.adapter} writes nothing into block "
                               f"{inputs.layer}'s residual stream; use the layer it targets")
        ref = inputs.mean_shift if inputs.x_base is not None else None
        dirs.sort(key=lambda d: -float(d.vector.norm()))
        return [Candidate(self.name, d.name,
                          orient(d.vector, ref) if ref is not None else d.vector,
                          float(d.vector.norm())) for d in dirs[:top]]
