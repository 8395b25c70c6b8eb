"""The ecosystem's doors: SAELens pretrained SAEs (`sae_lens:RELEASE/SAE_ID`, offline from a HF
cache the test builds) and TransformerLens models (TransformerBridge, HookedTransformer)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import saediff
from saediff.errors import SaediffError
from saediff.models import load_model

RELEASE = "saediff-test-release"
REPO = "saediff-test/tiny-saes"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _topk_sae(d_in: int = 32, d_sae: int = 64, layer: int = 1, seed: int = 0):
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(seed)
    cfg = TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=4,
                        metadata=SAEMetadata(hook_name=f"blocks.{layer}.hook_resid_post"))
    sae = TopKSAE(cfg)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.5)
        sae.W_dec.mul_(0.8)
    return sae.eval()


@pytest.fixture()
def hf_cache(tmp_path, monkeypatch):
    """A Hugging Face hub cache holding one repo with two SAEs, and a SAELens release entry
    pointing at it; the hub is offline, so only this cache can answer."""
    import huggingface_hub.constants as hc
    from sae_lens.loading.pretrained_saes_directory import PretrainedSAELookup, get_pretrained_saes_directory

    cache = tmp_path / "hub"
    snap = cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / COMMIT
    saes = {}
    for folder, layer, d_in in (("layer_1/width_64", 1, 32), ("wide/layer_1", 1, 48)):
        sae = _topk_sae(d_in=d_in, layer=layer)
        sae.save_model(snap / folder)
        saes[folder] = sae
    (snap.parent.parent / "refs").mkdir(parents=True)
    (snap.parent.parent / "refs" / "main").write_text(COMMIT)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    lookup = PretrainedSAELookup(
        release=RELEASE, repo_id=REPO, model="tiny", conversion_func=None,
        saes_map={"layer_1/width_64": "layer_1/width_64", "wide": "wide/layer_1"},
        expected_var_explained={}, expected_l0={}, neuronpedia_id={}, norm_scaling_factor={},
        config_overrides=None)
    monkeypatch.setitem(get_pretrained_saes_directory(), RELEASE, lookup)
    return saes


def test_sae_lens_release_loads_offline_from_hf_cache(hf_cache):
    from saediff.sae import sae_layer

    sae = saediff.load_sae(f"sae_lens:{RELEASE}/layer_1/width_64")
    want = hf_cache["layer_1/width_64"]
    assert type(sae).__name__ == "TopKSAE" and sae.cfg.k == 4
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        assert torch.equal(getattr(sae, name), getattr(want, name)), name
    assert sae_layer(sae) == 1
    # the SAE id maps to a folder by the release entry, not by the id itself
    wide = saediff.load_sae(f"sae_lens:{RELEASE}/wide")
    assert torch.equal(wide.W_enc, hf_cache["wide/layer_1"].W_enc)


def test_sae_lens_refusals_are_one_line(hf_cache, tiny_qwen):
    from saediff.sae import check_sae

    with pytest.raises(SaediffError, match="not found in release"):
        saediff.load_sae(f"sae_lens:{RELEASE}/layer_9/none")
    with pytest.raises(SaediffError, match="not in the Hugging Face cache"):
        saediff.load_sae("sae_lens:saediff-test/absent-repo/layer_1")
    with pytest.raises(SaediffError, match="RELEASE/SAE_ID"):
        saediff.load_sae("sae_lens:just-a-release")
    lm = load_model(tiny_qwen)
    check_sae(saediff.load_sae(f"sae_lens:{RELEASE}/layer_1/width_64"), lm, 1)  # fits
    with pytest.raises(SaediffError, match="d_in is 48"):
        check_sae(saediff.load_sae(f"sae_lens:{RELEASE}/wide"), lm, 1)
    with pytest.raises(SaediffError, match="does not match the SAE's layer 1"):
        check_sae(saediff.load_sae(f"sae_lens:{RELEASE}/layer_1/width_64"), lm, 2)


def test_sae_lens_ref_on_the_cli(hf_cache, tiny_qwen, tmp_path, capsys):
    """`saediff steer --sae sae_lens:...` reaches the loader and its fit check before work."""
    from saediff.cli import main

    prompts = tmp_path / "p.txt"
    prompts.write_text("how do i save money ?\n")
    rc = main(["steer", "--model", str(tiny_qwen), "--sae", f"sae_lens:{RELEASE}/wide",
               "--latent", "0", "--clamp", "1", "--prompts", str(prompts), "--judge", "none",
               "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert rc == 2 and "SAE d_in=48 does not match the model's d_model=32" in err, err
    assert not (tmp_path / "s" / "summary.json").exists()


# --- TransformerLens models -------------------------------------------------------------

def _organism_sae(d_in: int, layer: int = 1):
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(3)
    sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=128, k=8,
                                metadata=SAEMetadata(hook_name=f"blocks.{layer}.hook_resid_post")))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)
    return sae.eval()


def hooked_transformer(path: Path):
    """The organism as a HookedTransformer, offline: TransformerLens resolves only its official
    names, and its Llama converter drops attention biases (the organism has them)."""
    from transformer_lens import HookedTransformer
    from transformer_lens import loading_from_pretrained as loading
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    cfg = loading.get_pretrained_model_config(str(path), hf_cfg=hf.config.to_dict(), device="cpu",
                                              dtype=torch.float32, fold_ln=False,
                                              default_prepend_bos=False)
    sd = loading.get_pretrained_state_dict(str(path), cfg, hf_model=hf, dtype=torch.float32)
    for i, blk in enumerate(hf.model.layers):
        for n, proj in (("Q", blk.self_attn.q_proj), ("K", blk.self_attn.k_proj),
                        ("V", blk.self_attn.v_proj)):
            sd[f"blocks.{i}.attn.b_{n}"] = proj.bias.detach().reshape(-1, cfg.d_head)
    ht = HookedTransformer(cfg, AutoTokenizer.from_pretrained(path), move_to_device=False)
    ht.load_and_process_state_dict(sd, fold_ln=False, center_writing_weights=False,
                                   center_unembed=False, fold_value_biases=False,
                                   refactor_factored_attn_matrices=False)
    return ht.eval()


@pytest.fixture(scope="module")
def organism_three_ways():
    from transformer_lens.model_bridge import TransformerBridge

    from saediff.organism import organism_path

    path = organism_path() / "base"
    lm = load_model(path)
    bridge = TransformerBridge.boot_transformers(str(path), device="cpu", dtype=torch.float32)
    return lm, bridge, hooked_transformer(path)


def _tl_clean(model) -> bool:
    return (all(not hp._forward_hooks and not hp._forward_pre_hooks
                for hp in model.hook_dict.values())
            and "forward" not in vars(model) and not model._forward_pre_hooks)


PROMPT = [[270, 95, 274, 497, 367, 10, 292, 291]]


@pytest.mark.parametrize("mode", ["clamp", "add", "ablate", "clamp_generated"])
def test_same_steering_on_hf_bridge_and_hooked_transformer(organism_three_ways, mode):
    lm, bridge, ht = organism_three_ways
    sae = _organism_sae(lm.d_model)
    x = torch.tensor(PROMPT)
    with torch.no_grad():
        j = int(sae.encode(_resid_of(lm, x)).sum((0, 1)).argmax())  # a latent that fires
        kw = {"clamp": dict(clamp=5.0), "add": dict(add=4.0), "ablate": dict(ablate=True),
              "clamp_generated": dict(clamp=5.0, positions=5)}[mode]
        with saediff.steer(lm, sae, latent=j, **kw):
            ref = lm(input_ids=x).logits
        plain = lm(input_ids=x).logits
        got = {}
        for name, m in (("bridge", bridge), ("hooked", ht)):
            with saediff.steer(m, sae, latent=j, **kw):
                got[name] = m(x)
            assert _tl_clean(m), name
    assert (ref - plain).abs().max() > 0.05  # the edit changes the logits
    if mode == "clamp_generated":  # positions before 5 untouched, later ones steered
        assert torch.allclose(ref[:, :5], plain[:, :5], atol=1e-5)
        assert (ref[:, 5:] - plain[:, 5:]).abs().max() > 0.05
    for name, logits in got.items():
        assert (logits - ref).abs().max() < 1e-4, (name, (logits - ref).abs().max())


def _resid_of(lm, x):
    from saediff.models import capture_residual

    with capture_residual(lm, 1) as box:
        lm.model(input_ids=x, use_cache=False)
    return box["resid"]


def test_generated_positions_during_tl_generate_match_hf(organism_three_ways):
    """positions='generated' during each library's own generate: same tokens as HF. (The
    bridge's KV-cached generate differs from HF's even unsteered on this model, TL 3.9.0, so
    the bridge runs cacheless; docs/steer.md.)"""
    lm, bridge, ht = organism_three_ways
    sae = _organism_sae(lm.d_model)
    x = torch.tensor(PROMPT)
    with torch.no_grad():
        with saediff.steer(lm, sae, latent=7, clamp=40.0, positions="generated"):
            ref = lm.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=6,
                              do_sample=False)
        plain = lm.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=6,
                            do_sample=False)
        assert not torch.equal(ref, plain)  # the clamp steers the continuation
        for m, caches in ((ht, (True, False)), (bridge, (False,))):
            for cache in caches:
                with saediff.steer(m, sae, latent=7, clamp=40.0, positions="generated"):
                    out = m.generate(x, max_new_tokens=6, do_sample=False, verbose=False,
                                     use_past_kv_cache=cache)
                assert torch.equal(out, ref), (type(m).__name__, cache, out, ref)
                assert _tl_clean(m)


def test_tl_hooks_removed_on_error(organism_three_ways):
    _, bridge, ht = organism_three_ways
    sae = _organism_sae(96)
    for m in (bridge, ht):
        with pytest.raises(RuntimeError, match="boom"):
            with saediff.steer(m, sae, latent=0, clamp=1.0, positions="generated"):
                raise RuntimeError("boom")
        assert _tl_clean(m)
        with pytest.raises(SaediffError, match="out of range"):
            with saediff.steer(m, direction=torch.ones(96), add=1.0, layer=7):
                pass


def test_cache_and_differ_take_a_bridge(organism_three_ways, tmp_path):
    """The Python cache and differ entry points accept a TransformerBridge: same activations as
    saediff's own model; a HookedTransformer is refused with the fix."""
    from saediff.cache.writer import CacheConfig, build_cache
    from saediff.diff.differ import latent_activations

    lm, bridge, ht = organism_three_ways
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"text": t}) for t in
                              ["how can i save money ?", "you should rest and drink water ."] * 3))
    caches = {}
    for name, m in (("own", lm), ("bridge", bridge)):
        cfg = CacheConfig(base="organism", layer=1, dataset=str(data), max_tokens=40, ctx_len=16,
                          batch_size=2, dtype="float32", out=str(tmp_path / f"{name}.h5"))
        caches[name] = saediff.open_cache(build_cache(cfg, models={"base": m}))
    own, br = caches["own"], caches["bridge"]
    assert own.rows == br.rows > 0
    assert (own.tokens() == br.tokens()).all()
    assert torch.allclose(own.activations("base", 0, own.rows),
                          br.activations("base", 0, br.rows), atol=1e-5)
    sae = _organism_sae(lm.d_model)
    batches = [[[270, 95, 274, 497, 367, 10], [292, 291, 196]]]
    a = latent_activations(lm, sae, 1, batches)
    b = latent_activations(bridge, sae, 1, batches)
    assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(a, b)) and a[0].abs().sum() > 0
    with pytest.raises(SaediffError, match="boot_transformers"):
        latent_activations(ht, sae, 1, batches)
