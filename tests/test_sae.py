"""saediff.sae: one loader, one answer to "which layer", one fit check (SAELens SAEs on disk)."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from saediff.errors import SaediffError
from saediff.sae import (
    check_sae_shapes,
    check_sae_weights,
    decoder_directions,
    load_sae,
    require_activation_sae,
    resolve_layer,
    sae_input_kind,
    sae_layer,
)


def _topk(d_in: int = 8, d_sae: int = 16, hook: str | None = "blocks.2.hook_resid_post",
          seed: int = 0, rescale: bool = False):
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(seed)
    cfg = TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=2, rescale_acts_by_decoder_norm=rescale,
                        metadata=SAEMetadata(hook_name=hook))
    sae = TopKSAE(cfg)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)
        sae.W_dec.mul_(torch.linspace(0.5, 2.0, d_sae).unsqueeze(1))  # non-unit decoder rows
    return sae.eval()


def test_load_sae_round_trips_a_saved_sae(tmp_path):
    sae = _topk()
    sae.save_model(tmp_path / "run")
    back = load_sae(tmp_path / "run")
    assert type(back).__name__ == "TopKSAE" and sae_layer(back) == 2
    for name, t in sae.state_dict().items():
        assert torch.equal(back.state_dict()[name], t), name


def test_load_sae_refuses_what_is_not_a_whole_run(tmp_path):
    sae = _topk()
    sae.save_model(tmp_path / "sweep" / "k2")
    with pytest.raises(FileNotFoundError, match=r"holds no saved SAE.*sweep runs inside: \['k2'\]"):
        load_sae(tmp_path / "sweep")
    (tmp_path / "sweep" / "k2" / "cfg.json").write_text("{not json")
    with pytest.raises(SaediffError, match="cfg.json is not valid JSON"):
        load_sae(tmp_path / "sweep" / "k2")
    sae.save_model(tmp_path / "run")
    (tmp_path / "run" / ".saediff-incomplete").write_text('{"command": "train"}')
    with pytest.raises(SaediffError, match="incomplete: a `train` run"):
        load_sae(tmp_path / "run")


def test_shapes_are_checked_against_cfg_before_loading(tmp_path):
    sae = _topk()
    sae.save_model(tmp_path / "run")
    weights = tmp_path / "run" / "sae_weights.safetensors"
    cfg = json.loads((tmp_path / "run" / "cfg.json").read_text())
    check_sae_shapes(weights, cfg)
    with pytest.raises(SaediffError, match=r"(W_enc has shape \[8, 16\]|W_dec has shape \[16, 8\]) but "
                                           r"cfg.json says d_(in=8, d_sae=32|sae=32, d_in=8)"):
        check_sae_shapes(weights, {**cfg, "d_sae": 32})
    with pytest.raises(SaediffError, match="d_in must be a positive integer, got True"):
        check_sae_shapes(weights, {**cfg, "d_in": True})


def test_non_finite_weights_are_refused_with_the_first_position():
    sae = _topk()
    check_sae_weights(sae, "ok")
    with torch.no_grad():
        sae.W_dec[5, 3] = float("nan")
    with pytest.raises(SaediffError, match=r"W_dec holds 1 NaN/inf value\(s\) \(first at \[5, 3\]\)"):
        check_sae_weights(sae, "bad")


def _fake(hook=None, layer=None):
    meta = {k: v for k, v in (("hook_name", hook), ("layer", layer)) if v is not None}
    return SimpleNamespace(cfg=SimpleNamespace(metadata=meta))


@pytest.mark.parametrize("hook, layer, want", [
    ("blocks.3.hook_resid_post", None, 3),
    ("blocks.3.hook_resid_pre", None, 2),  # resid_pre of 3 is the output of block 2
    ("model.layers.5", None, 5),
    (None, 4, 4),
    ("blocks.1.hook_resid_post", 1, 1),
    (None, None, None),
])
def test_sae_layer_reads_hook_and_metadata(hook, layer, want):
    assert sae_layer(_fake(hook, layer)) == want


@pytest.mark.parametrize("hook, layer, message", [
    ("blocks.1.attn.hook_z", None, "not the residual stream"),
    ("blocks.0.hook_resid_pre", None, "reads the embeddings"),
    ("blocks.1.hook_resid_post", 2, "disagrees with itself"),
])
def test_sae_layer_refuses_what_it_cannot_use(hook, layer, message):
    with pytest.raises(SaediffError, match=message):
        sae_layer(_fake(hook, layer))


def test_resolve_layer_checks_an_explicit_layer():
    sae = _fake("blocks.2.hook_resid_post")
    assert resolve_layer(sae, None) == 2 and resolve_layer(sae, 2) == 2
    with pytest.raises(SaediffError, match="--layer 1 does not match the SAE's layer 2"):
        resolve_layer(sae, 1)
    with pytest.raises(SaediffError, match="records no layer; pass --layer"):
        resolve_layer(_fake(), None)
    assert resolve_layer(_fake(), 4) == 4


def test_decoder_directions_follow_the_decoder_norm_rescaling():
    plain = _topk(rescale=False)
    d = decoder_directions(plain, [3, 0])
    assert torch.equal(d, plain.W_dec.detach()[[3, 0]])
    rescaled = _topk(rescale=True)
    d = decoder_directions(rescaled, [3, 0])
    assert torch.allclose(d.norm(dim=-1), torch.ones(2))
    assert torch.allclose(d, rescaled.W_dec.detach()[[3, 0]] / rescaled.W_dec.detach()[[3, 0]]
                          .norm(dim=-1, keepdim=True))


def test_input_kind_gates_diff_and_steer():
    sae = _topk()
    assert sae_input_kind(sae) == "activations"
    require_activation_sae(sae, "p", "diff")
    sae.cfg.metadata.saediff_input = "difference"
    assert sae_input_kind(sae) == "difference"
    with pytest.raises(SaediffError, match="trained on fine-tuned - base differences"):
        require_activation_sae(sae, "p", "steer")
