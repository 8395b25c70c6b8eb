"""The public API: `import saediff` exports the stage entry points and configs (issue 21 item 6).

`cache`, `train` and `steer` are both subpackages and entry-point functions: the attribute stays
the function whatever stage module is imported later (no callable-module trick).
"""
from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
import torch

import saediff

LAYER = 1
J = 3


def test_import_is_light():
    """`import saediff` loads none of the heavy libraries (the CLI's start depends on it)."""
    code = ("import sys, saediff; print(sorted(m for m in ('torch', 'transformers', 'sae_lens', "
            "'h5py', 'numpy', 'plotly') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("name, module", [
    ("run_diff", "saediff.diff.differ"), ("run_steer", "saediff.steer.evaluate"),
    ("CacheConfig", "saediff.cache.writer"), ("TrainConfig", "saediff.train.loop"),
    ("DiffConfig", "saediff.diff.data"), ("SteerConfig", "saediff.steer.evaluate"),
    ("load_model", "saediff.models"), ("load_sae", "saediff.sae"),
    ("open_cache", "saediff.cache.format"), ("ActivationStore", "saediff.cache.store"),
    ("SaediffError", "saediff.errors"), ("organism_path", "saediff.organism"),
])
def test_exports_are_the_stage_objects(name, module):
    assert getattr(saediff, name) is getattr(importlib.import_module(module), name)
    assert name in saediff.__all__


def test_entry_points_stay_functions_after_stage_imports():
    for mod in ("saediff.steer.hooks", "saediff.cache.writer", "saediff.train.loop",
                "saediff.steer.evaluate"):
        importlib.import_module(mod)
    for name in ("cache", "train", "steer"):
        fn = getattr(saediff, name)
        assert callable(fn) and not isinstance(fn, type(saediff)), name
    assert saediff.steer.__module__ == "saediff"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        saediff.nope  # noqa: B018


def test_deprecated_module_paths_are_gone():
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("saediff.cachefile")


@pytest.mark.parametrize("name, module, target", [
    ("cache", "saediff.cache.writer", "build_cache"), ("train", "saediff.train.loop", "train")])
def test_cache_and_train_call_their_stage(name, module, target, monkeypatch):
    calls = []
    monkeypatch.setattr(importlib.import_module(module), target,
                        lambda cfg, **kw: calls.append((cfg, kw)) or "done")
    assert getattr(saediff, name)("CFG", stop_after=3) == "done"
    assert calls == [("CFG", {"stop_after": 3})]


@pytest.fixture(scope="module")
def lm_sae(tiny_qwen):
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(0)
    sae = StandardSAE(StandardSAEConfig(d_in=32, d_sae=64, metadata=SAEMetadata(
        hook_name=f"blocks.{LAYER}.hook_resid_post")))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.5)
        sae.b_enc[J] = 3.0  # active on every token
    return saediff.load_model(tiny_qwen), sae.eval()


def _logits(lm, ids):
    with torch.no_grad():
        return lm.model(input_ids=ids, use_cache=False).logits


def _hooks(lm) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in lm.model.modules())


def test_steer_clamps_like_the_formula_and_removes_its_hooks(lm_sae):
    """`saediff.steer(clamp=c)` gives the logits of h + (c - f_J(h)) d_J after block LAYER."""
    lm, sae = lm_sae
    ids = torch.tensor([[5, 9, 14, 3, 22, 7]])
    plain = _logits(lm, ids)
    with saediff.steer(lm, sae, latent=J, clamp=0.0):
        steered = _logits(lm, ids)
        assert _hooks(lm) == 1

    def manual(_m, _inp, out):
        h = out[0] if isinstance(out, tuple) else out
        f = sae.encode(h)[..., J:J + 1]
        new = h + (0.0 - f) * sae.W_dec[J]
        return (new, *out[1:]) if isinstance(out, tuple) else new

    handle = lm.layers[LAYER].register_forward_hook(manual)
    try:
        expected = _logits(lm, ids)
    finally:
        handle.remove()
    assert _hooks(lm) == 0
    assert (steered - plain).abs().max() > 1e-3  # the clamp moved the logits
    torch.testing.assert_close(steered, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(_logits(lm, ids), plain)  # and nothing is left behind
    with pytest.raises(RuntimeError, match="boom"), saediff.steer(lm, sae, latent=J, add=2.0):
        raise RuntimeError("boom")
    assert _hooks(lm) == 0
