"""Several layers at once: `--layers` parsing, the multi-layer cache, per-layer training."""
from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from saediff.cache.format import open_cache, partial_path, verify_cache
from saediff.cache.writer import CacheConfig, build_cache
from saediff.errors import SaediffError
from saediff.layerspec import parse_layers
from saediff.models import load_model, pad_batch, run_to_layer, run_to_layers

from test_cache import write_data


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("ldata") / "docs.jsonl")


def test_parse_layers():
    assert parse_layers("0-3") == [0, 1, 2, 3]
    assert parse_layers("18, 6,12") == [6, 12, 18]
    assert parse_layers("0-2,8") == [0, 1, 2, 8]
    assert parse_layers([4, 2]) == [2, 4] and parse_layers(7) == [7]
    for bad, msg in (("", "empty"), ("6,6", "more than once"), ("0-3,2", "more than once"),
                     ("3-1", "backwards"), ("a", "cannot read"), ("1,,2", "cannot read"),
                     ([-1], "negative")):
        with pytest.raises(SaediffError, match=msg):
            parse_layers(bad)


def test_run_to_layers_equals_run_to_layer(tiny_qwen):
    lm = load_model(tiny_qwen)
    ids, mask = pad_batch([[5, 9, 11, 30, 31], [7, 8]], lm.tokenizer.pad_token_id)
    got = run_to_layers(lm, ids, mask, [0, 2])
    assert sorted(got) == [0, 2]
    for layer in (0, 2):
        assert torch.equal(got[layer][mask.bool()], run_to_layer(lm, ids, mask, layer)[mask.bool()])
    assert all(not m._forward_hooks for m in lm.layers)  # every hook removed


def _cfg(tmp_path, model, ft, data, name, **kw):
    return CacheConfig(base=str(model), finetuned=str(ft), dataset=str(data),
                       out=str(tmp_path / name), max_tokens=300, ctx_len=20, batch_size=4,
                       dtype="float32", **kw)


def test_multi_layer_rows_equal_single_layer_rows(tmp_path, tiny_qwen, tiny_qwen_ft, data):
    multi = build_cache(_cfg(tmp_path, tiny_qwen, tiny_qwen_ft, data, "m.h5", layers="2,0"))
    assert verify_cache(multi) == []
    for layer in (0, 2):
        single = build_cache(_cfg(tmp_path, tiny_qwen, tiny_qwen_ft, data, f"s{layer}.h5",
                                  layer=layer))
        with open_cache(multi, layer=layer) as m, open_cache(single) as s:
            assert (m.layer, m.hook_name, m.rows) == (layer, f"blocks.{layer}.hook_resid_post", s.rows)
            assert np.array_equal(m.tokens(), s.tokens())
            for src in ("base", "finetuned"):
                assert torch.equal(m.activations(src), s.activations(src)), (layer, src)
    with open_cache(multi, layer=0) as a, open_cache(multi, layer=2) as b:
        assert not torch.allclose(a.activations("base"), b.activations("base"))
    with open_cache(multi) as c:
        assert c.layers == [0, 2] and c.info()["layers"] == [0, 2]
        with pytest.raises(SaediffError, match=r"holds layers \[0, 2\]; open it at one"):
            c.activations("base", 0, 4)
    with pytest.raises(SaediffError, match=r"holds layer\(s\) \[0, 2\], not 1"):
        open_cache(multi, layer=1)
    # --layers N is --layer N: a plain single-layer cache
    one = build_cache(_cfg(tmp_path, tiny_qwen, tiny_qwen_ft, data, "one.h5", layers="2"))
    with h5py.File(one, "r") as f:
        assert "acts/base" in f and "layers" not in f.attrs
    # the same command again: complete with the same provenance, nothing to do
    mtime = multi.stat().st_mtime_ns
    build_cache(_cfg(tmp_path, tiny_qwen, tiny_qwen_ft, data, "m.h5", layers="0,2"))
    assert multi.stat().st_mtime_ns == mtime
    with pytest.raises(SaediffError, match="different provenance"):
        build_cache(_cfg(tmp_path, tiny_qwen, tiny_qwen_ft, data, "m.h5", layers="0,1"))


def test_multi_layer_resume_and_verify(tmp_path, tiny_qwen, tiny_qwen_ft, data, monkeypatch):
    from saediff.cache import writer

    ref = build_cache(_cfg(tmp_path, tiny_qwen, tiny_qwen_ft, data, "ref.h5", layers="0-2"))
    forward, calls = writer._forward_batch, []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) > 2:
            raise KeyboardInterrupt
        return forward(*a, **k)

    monkeypatch.setattr(writer, "_forward_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_cache(_cfg(tmp_path, tiny_qwen, tiny_qwen_ft, data, "r.h5", layers="0-2"))
    monkeypatch.setattr(writer, "_forward_batch", forward)
    out = tmp_path / "r.h5"
    assert partial_path(out).exists() and not out.exists()
    with open_cache(out, allow_partial=True, layer=1) as c:
        assert 0 < c.rows < 300
    build_cache(_cfg(tmp_path, tiny_qwen, tiny_qwen_ft, data, "r.h5", layers="0-2"))
    with h5py.File(ref, "r") as a, h5py.File(out, "r") as b:
        names = sorted(b["acts"])
        assert names == sorted(f"{s}.layer{x}" for s in ("base", "finetuned") for x in (0, 1, 2))
        for n in ["tokens", "seq_offsets", "progress"] + [f"acts/{n}" for n in names]:
            assert np.array_equal(a[n][:], b[n][:]), n
    # a flipped stored value in one layer's dataset is found by verify
    with h5py.File(out, "r+") as f:
        f["acts/finetuned.layer1"][5, 3] = np.nan
    problems = verify_cache(out)
    assert len(problems) == 1 and "finetuned.layer1" in problems[0] and "row 5" in problems[0]


@pytest.mark.parametrize("spec,msg", [("0-9", "out of range"), ("", "empty"),
                                      ("1,1", "more than once")])
def test_bad_layers_one_line_exit_2_before_any_model(tmp_path, tiny_qwen, data, spec, msg,
                                                     monkeypatch, capsys):
    from saediff.cache import writer
    from saediff.cli import main

    def no_model(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(writer, "load_cache_models", no_model)
    rc = main(["cache", "--base", str(tiny_qwen), "--dataset", str(data), "--layers", spec,
               "--out", str(tmp_path / "x.h5")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and msg in err[0] and "--layers" in err[0], err
    assert not (tmp_path / "x.h5").exists() and not partial_path(tmp_path / "x.h5").exists()


def test_train_per_layer_equals_single_layer_runs(tmp_path, tiny_qwen, tiny_qwen_ft, data):
    from safetensors.torch import load_file

    from saediff.sae import load_sae
    from saediff.train.loop import TrainConfig, train

    multi = build_cache(_cfg(tmp_path, tiny_qwen, tiny_qwen_ft, data, "m.h5", layers="0,2"))
    single = build_cache(_cfg(tmp_path, tiny_qwen, tiny_qwen_ft, data, "s2.h5", layer=2))
    kw = dict(d_sae=64, k=4, total_tokens=512, batch_size=64, eval_fraction=0.2,
              checkpoint_every=0, norm_batches=2, buffer_rows=256)
    dirs = train(TrainConfig(cache=[str(multi)], out=str(tmp_path / "runs"), layers="0,2", **kw),
                 evals=False)
    assert dirs == [tmp_path / "runs" / "layer_0", tmp_path / "runs" / "layer_2"]
    for layer, d in zip((0, 2), dirs):
        sae = load_sae(d)
        assert sae.cfg.metadata.hook_name == f"blocks.{layer}.hook_resid_post"
        assert sae.cfg.metadata.layer == layer
    # the layer-2 SAE of the multi-layer run is the SAE a single-layer cache trains
    ref = train(TrainConfig(cache=[str(single)], out=str(tmp_path / "ref"), **kw), evals=False)[0]
    a, b = load_file(dirs[1] / "sae_weights.safetensors"), load_file(ref / "sae_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["W_dec"], load_file(dirs[0] / "sae_weights.safetensors")["W_dec"])
    with pytest.raises(SaediffError, match=r"holds layer\(s\) \[0, 2\], not 1"):
        train(TrainConfig(cache=[str(multi)], out=str(tmp_path / "x"), layers="1-2", **kw))
    with pytest.raises(SaediffError, match="holds layers"):
        train(TrainConfig(cache=[str(multi)], out=str(tmp_path / "y"), **kw))
    assert not (tmp_path / "x").exists()


def test_train_layers_two_ranks_equal_one_rank(tmp_path, tiny_qwen, tiny_qwen_ft, data):
    """Under torchrun each layer's run is data-parallel: 2 ranks give the 1-rank SAEs."""
    from safetensors.torch import load_file

    from saediff.train.loop import TrainConfig, train

    from test_train_dist import _torchrun

    multi = build_cache(_cfg(tmp_path, tiny_qwen, tiny_qwen_ft, data, "m.h5", layers="0,2"))
    kw = dict(d_sae=64, k=4, total_tokens=1024, batch_size=128, lr=3e-3, eval_fraction=0.2,
              checkpoint_every=0, norm_batches=2, buffer_rows=256, threads=1)
    one = train(TrainConfig(cache=[str(multi)], out=str(tmp_path / "one"), layers="0,2", **kw),
                evals=False)
    flags = [x for k, v in kw.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    _torchrun(["-m", "saediff", "train", "--cache", str(multi), "--layers", "0,2",
               "--out", str(tmp_path / "two"), "--no-evals", *flags], tmp_path)
    for d in one:
        a = load_file(d / "sae_weights.safetensors")
        b = load_file(tmp_path / "two" / d.name / "sae_weights.safetensors")
        for k in a:
            assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), (d.name, k)
