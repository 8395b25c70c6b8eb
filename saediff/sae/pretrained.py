"""SAELens pretrained SAEs: `sae_lens:RELEASE/SAE_ID` through `sae_lens.SAE.from_pretrained`.

RELEASE is a name in SAELens's `pretrained_saes.yaml` (e.g. `gemma-scope-2b-pt-res-canonical`)
or a Hugging Face repo id (`org/repo`); SAE_ID is the id within it and may contain slashes
(`layer_12/width_16k/canonical`). Downloads go to the Hugging Face cache; with
`HF_HUB_OFFLINE=1` only that cache is read. The fit checks (`saediff.sae.check_sae`: d_in,
hook_name's layer) apply as for local SAEs, since SAELens keeps `hook_name` in `cfg.metadata`.
"""
from __future__ import annotations

import logging
from typing import Any

from saediff.errors import SaediffError

log = logging.getLogger(__name__)

PREFIX = "sae_lens:"


def is_pretrained_ref(ref: Any) -> bool:
    """True for a `sae_lens:...` string (a local path is never written that way)."""
    return isinstance(ref, str) and ref.startswith(PREFIX)


def split_ref(ref: str) -> tuple[str, str]:
    """`sae_lens:RELEASE/SAE_ID` -> (release, sae_id).

    The release is the longest prefix that SAELens's directory knows; otherwise the first
    two path parts are a Hugging Face repo id when there are three or more, else the first part.
    """
    body = ref[len(PREFIX):] if ref.startswith(PREFIX) else ref
    parts = [p for p in body.split("/")]
    if len(parts) < 2 or not all(parts):
        raise SaediffError(f"--sae {ref!r} is not sae_lens:RELEASE/SAE_ID; e.g. "
                           "sae_lens:gemma-scope-2b-pt-res-canonical/layer_12/width_16k/canonical")
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    known = get_pretrained_saes_directory()
    for cut in range(len(parts) - 1, 0, -1):
        release = "/".join(parts[:cut])
        if release in known:
            return release, "/".join(parts[cut:])
    cut = 2 if len(parts) >= 3 else 1
    return "/".join(parts[:cut]), "/".join(parts[cut:])


def load_pretrained(ref: str, device: str = "cpu") -> Any:
    """The SAELens SAE that `ref` names, read from (or downloaded into) the HF cache."""
    release, sae_id = split_ref(ref)
    from huggingface_hub.errors import LocalEntryNotFoundError
    from sae_lens import SAE

    log.info("loading SAELens release %s, SAE %s", release, sae_id)
    try:
        sae = SAE.from_pretrained(release, sae_id, device=device)
    except LocalEntryNotFoundError as exc:
        raise SaediffError(f"--sae {ref!r}: release {release!r} SAE {sae_id!r} is not in the "
                           "Hugging Face cache and the hub is unreachable or HF_HUB_OFFLINE=1; "
                           "run once online to download it") from exc
    except ValueError as exc:  # SAELens's unknown-release / unknown-id messages
        raise SaediffError(f"--sae {ref!r}: {exc}") from exc
    return sae.eval()
