"""saediff train: sparse TopK gradients, known-answer recovery, resume, fold, errors, evals."""
from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from saediff.errors import SaediffError
from saediff.sae import load_sae
from saediff.train.loop import TrainConfig, build_sae, check_caches, train
from saediff.train.trainer import TensorStore

import tiny

ROOT = Path(__file__).resolve().parents[2]


def write_array_cache(path: Path, acts: dict[str, np.ndarray], seq_len: int = 32,
                      layer: int = 1, role: int = 3, model_name: str = "synthetic") -> Path:
    """Arrays -> a saediff cache file (same schema and writer helpers as `saediff cache`)."""
    from saediff.cache.format import P_COMPLETE, P_ROWS, P_SEQS
    from saediff.cache.writer import _create

    n, d = next(iter(acts.values())).shape
    prov = {"schema_version": 1, "layer": layer, "hook_name": f"blocks.{layer}.hook_resid_post",
            "d_model": d, "dtype": "float32", "ctx_len": seq_len, "max_tokens": n,
            "sources": list(acts),
            "models": {s: {"name": model_name, "adapter": ""} for s in acts},
            "dataset": {"source": "synthetic"}}
    f = _create(path, prov)
    lens = [min(seq_len, n - a) for a in range(0, n, seq_len)]
    idx = {"tokens": np.zeros(n, np.int32), "roles": np.full(n, role, np.int8),
           "seq_ids": np.repeat(np.arange(len(lens)), lens),
           "doc_ids": np.repeat(np.arange(len(lens)), lens),
           "positions": np.concatenate([np.arange(k) for k in lens])}
    for k, v in idx.items():
        f[k].resize(n, axis=0)
        f[k][:] = v
    for s, x in acts.items():
        f["acts"][s].resize(n, axis=0)
        f["acts"][s][:] = x
    f["seq_offsets"].resize(len(lens) + 1, axis=0)
    f["seq_offsets"][1:] = np.cumsum(lens)
    f["progress"][P_ROWS], f["progress"][P_SEQS], f["progress"][P_COMPLETE] = n, len(lens), 1
    f.close()
    return path


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """Activations from a known 48-feature dictionary in d=24 (sae_lens.synthetic), cached."""
    from sae_lens.synthetic import ActivationGenerator, FeatureDictionary

    fd = FeatureDictionary(48, 24, seed=0)
    gen = ActivationGenerator(48, firing_probabilities=0.06, std_firing_magnitudes=0.2,
                              mean_firing_magnitudes=1.0)
    torch.manual_seed(0)
    with torch.no_grad():
        x = fd(gen.sample(40_000)) * 7.0 + 2.0       # raw scale far from sqrt(d) on purpose
    path = write_array_cache(tmp_path_factory.mktemp("synth") / "synth.h5",
                             {"base": x.numpy(), "finetuned": x.numpy()[::-1].copy()})
    return path, fd.feature_vectors.detach()


def _cfg(cache, out, **kw):
    base = dict(cache=[str(cache)], out=str(out), d_sae=64, k=3, total_tokens=60 * 512,
                batch_size=512, lr=3e-3, eval_sequences=0, eval_rows=4000, checkpoint_every=20,
                log_every=5, buffer_rows=8192, norm_batches=4, dead_feature_window=50)
    base.update(kw)
    return TrainConfig(**base)


# --- the sparse step ----------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
@pytest.mark.parametrize("rescale", [True, False])
def test_sparse_gradients_equal_saelens_dense(arch, rescale):
    from sae_lens.saes.sae import TrainStepInput

    from saediff.train.sparse import SparseTopKStep

    cfg = TrainConfig(architecture=arch, d_sae=96, k=5, sae_kwargs={
        "rescale_acts_by_decoder_norm": rescale}, normalize=False)
    sae = build_sae(cfg, 20, {})
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
        sae.W_dec.mul_(torch.rand(96, 1) + 0.5)   # uneven decoder norms
    fast = copy.deepcopy(sae)
    x = torch.randn(40, 20)
    dead = torch.rand(96) < 0.3                  # exercises the auxiliary loss too
    out = sae.training_forward_pass(TrainStepInput(x, {}, dead, 0, False))
    out.loss.backward()
    r = SparseTopKStep(fast)(x, dead)
    assert torch.allclose(out.loss.detach(), r["loss"], rtol=1e-5)
    assert r["auxiliary_reconstruction_loss"] > 0
    for (name, p), q in zip(sae.named_parameters(), fast.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6), name
    if arch == "batchtopk":
        assert torch.equal(sae.topk_threshold, fast.topk_threshold)


# --- known answer -------------------------------------------------------------------------------

def test_synthetic_features_recovered_through_cache(synth, tmp_path):
    from sae_lens.synthetic import mean_correlation_coefficient

    path, feats = synth
    cfg = _cfg(path, tmp_path / "run", d_sae=96, total_tokens=600 * 512, lr=4e-3,
               checkpoint_every=0)
    (run,) = train(cfg)
    sae = load_sae(run)
    w = sae.W_dec.detach()
    cos = torch.nn.functional.normalize(feats, dim=1) @ torch.nn.functional.normalize(w, dim=1).T
    mmcs = cos.max(1).values.mean().item()
    mcc = mean_correlation_coefficient(feats, w)
    (tmp_path / "recovery.json").write_text(json.dumps({"mmcs": mmcs, "mcc": mcc}))
    print(f"known-answer: mean max cosine {mmcs:.3f}, MCC {mcc:.3f}")
    assert mmcs > 0.95 and mcc > 0.9, (mmcs, mcc)
    ev = json.loads((run / "evals.json").read_text())
    assert set(ev) == {"base", "finetuned"}
    assert ev["base"]["fvu"] < 0.3 and 2 < ev["base"]["l0"] <= 3


# --- resume -------------------------------------------------------------------------------------

def test_resume_after_sigkill_is_bitwise_identical(synth, tmp_path):
    path, _ = synth
    cfg = {"cache": [str(path)], "d_sae": 64, "k": 4, "total_tokens": 500 * 256,
           "batch_size": 256, "checkpoint_every": 25, "eval_sequences": 0, "eval_rows": 2000,
           "buffer_rows": 4096, "norm_batches": 2, "dead_feature_window": 20, "threads": 1}
    killed, rerun = tiny.kill_train_mid_run(cfg, tmp_path, "sae_weights.safetensors", 50)
    assert rerun() == 0
    whole = tmp_path / "whole"                       # same config, uninterrupted, in-process
    train(TrainConfig(**cfg, out=str(whole)), evals=False)
    a = load_file(killed / "sae_weights.safetensors")
    b = load_file(whole / "sae_weights.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (killed / "metrics.jsonl").read_text() == (whole / "metrics.jsonl").read_text()


@pytest.mark.parametrize("arch", ["batchtopk", "jumprelu"])
def test_simulated_interruption_resumes_exactly(arch, tmp_path):
    data = torch.randn(8000, 16) * 3
    outs = []
    for mode in ("whole", "split"):
        cfg = TrainConfig(out=str(tmp_path / mode), architecture=arch, d_sae=48, k=4,
                          total_tokens=40 * 128, batch_size=128, checkpoint_every=10,
                          dead_feature_window=5)
        if mode == "split":
            train(cfg, evals=False, store=TensorStore(data, 128), stop_after=27)
        train(cfg, evals=False, store=TensorStore(data, 128))
        outs.append(load_file(tmp_path / mode / "sae_weights.safetensors"))
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])


def test_resume_with_a_changed_config_is_refused(tmp_path):
    data = torch.randn(4000, 16) * 3
    cfg = TrainConfig(out=str(tmp_path / "r"), d_sae=48, k=4, total_tokens=40 * 128,
                      batch_size=128, checkpoint_every=10)
    train(cfg, evals=False, store=TensorStore(data, 128), stop_after=15)
    changed = dataclasses.replace(cfg, lr=1e-3)
    with pytest.raises(SaediffError, match=r"different training config \(lr: checkpoint 0.0004"):
        train(changed, evals=False, store=TensorStore(data, 128))
    # fields that do not change the result (logging, checkpoint cadence) may differ
    (run,) = train(dataclasses.replace(cfg, log_every=5, checkpoint_every=20), evals=False,
                   store=TensorStore(data, 128))
    assert (run / "sae_weights.safetensors").is_file()


def test_resume_on_a_rebuilt_cache_is_refused(tmp_path):
    x = np.random.default_rng(0).normal(size=(4096, 16)).astype(np.float32)
    cache = write_array_cache(tmp_path / "c.h5", {"base": x, "finetuned": x})
    cfg = TrainConfig(cache=[str(cache)], out=str(tmp_path / "r"), d_sae=32, k=4,
                      total_tokens=30 * 256, batch_size=256, checkpoint_every=10)
    train(cfg, evals=False, stop_after=12)
    cache.unlink()  # same path, activations of other models
    write_array_cache(cache, {"base": x, "finetuned": x}, model_name="other")
    with pytest.raises(SaediffError, match="different training config \\(cache_models"):
        train(cfg, evals=False)


# --- saved format, folding ----------------------------------------------------------------------

def test_saved_sae_loads_and_folds_scale(tmp_path):
    from sae_lens import SAE

    torch.manual_seed(1)
    data = torch.randn(6000, 16) * 40 + 5            # mean norm ~160, far from sqrt(16)
    cfg = TrainConfig(out=str(tmp_path / "r"), d_sae=48, k=4, total_tokens=30 * 128,
                      batch_size=128, checkpoint_every=30)
    (run,) = train(cfg, evals=False, store=TensorStore(data, 128))
    sae = SAE.load_from_disk(run)
    assert type(sae).__name__ == "TopKSAE" and sae.cfg.normalize_activations == "none"
    assert type(load_sae(run)) is type(sae)
    assert sae.cfg.metadata.layer is not None and "hook_name" in sae.cfg.metadata
    # the trained (normalised-space) SAE from the last checkpoint
    ck = run / "checkpoints" / json.loads((run / "checkpoints/latest.json").read_text())["dir"]
    scale = json.loads((ck / "state.json").read_text())["scale"]
    assert scale == pytest.approx(4.0 / data.norm(dim=1).mean().item(), rel=0.05)
    trained = build_sae(cfg, 16, {})
    trained.load_state_dict({k[4:]: v for k, v in load_file(ck / "sae0.safetensors").items()
                             if k.startswith("sae.")})
    x = data[:500]
    with torch.no_grad():
        want = trained(x * scale) / scale
        got = sae(x)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-3)
    assert ((got - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()) < 1.0


# --- errors -------------------------------------------------------------------------------------

class _NaNStore:
    d_model = 8

    def __init__(self, bad_step: int):
        self.i, self.bad = 0, bad_step

    def __next__(self):
        g = torch.Generator().manual_seed(self.i)
        x = torch.randn(64, 8, generator=g)
        if self.i == self.bad:
            x[3, 2] = float("nan")
        self.i += 1
        return x

    def peek_batches(self, n):
        return [torch.randn(64, 8)]

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, st):
        self.i = st["i"]


@pytest.mark.parametrize("arch", ["topk", "standard"])
def test_nan_loss_names_the_step_and_keeps_last_checkpoint(arch, tmp_path):
    cfg = TrainConfig(out=str(tmp_path / "r"), architecture=arch, d_sae=16, k=2,
                      total_tokens=20 * 64, batch_size=64, checkpoint_every=5)
    with pytest.raises(SaediffError, match=r"non-finite loss at step 7.*last good checkpoint: "
                                           r"step 5"):
        train(cfg, evals=False, store=_NaNStore(bad_step=7))
    latest = json.loads((tmp_path / "r/checkpoints/latest.json").read_text())
    assert latest["step"] == 5
    w = load_file(tmp_path / "r/checkpoints" / latest["dir"] / "sae0.safetensors")
    assert all(torch.isfinite(v.float()).all() for v in w.values())


def test_missing_source_role_and_d_in_mismatch(synth, tmp_path):
    path, _ = synth
    with pytest.raises(SaediffError, match=r"source\(s\) \['chat'\] not in .*available sources: "
                                           r"\['base', 'finetuned'\]"):
        check_caches(_cfg(path, tmp_path, sources={"chat": 1.0}))
    with pytest.raises(SaediffError, match="no rows with role"):
        train(_cfg(path, tmp_path / "r", roles=["response"]), evals=False)
    with pytest.raises(SaediffError, match="d_in mismatch.*d_model 24, expected 896"):
        check_caches(_cfg(path, tmp_path), d_in=896)
    other = write_array_cache(tmp_path / "d16.h5", {"base": np.zeros((64, 16), np.float32)})
    with pytest.raises(SaediffError, match="d_model"):
        train(TrainConfig(cache=[str(path), str(other)], out=str(tmp_path / "r2"),
                          sources={"base": 1.0}))
    data = torch.randn(2000, 16)
    cfg = TrainConfig(out=str(tmp_path / "r4"), d_sae=32, k=2, total_tokens=20 * 64,
                      batch_size=64, checkpoint_every=5)
    train(cfg, evals=False, store=TensorStore(data, 64), stop_after=7)
    with pytest.raises(SaediffError, match=r"d_in mismatch: checkpoint .* \(16, 32\)"):
        train(cfg, evals=False, store=TensorStore(torch.randn(2000, 8), 64))
    from saediff.cli import main

    assert main(["train", "--cache", str(path), "--out", str(tmp_path / "r3"),
                 "--sources", "chat=1"]) == 2


def test_sweep_reads_each_batch_once(synth, tmp_path):
    path, _ = synth
    cfg = _cfg(path, tmp_path / "sw", total_tokens=20 * 512, sweep={"k": [2, 4],
                                                                   "architecture": ["topk"]})
    runs = train(cfg, evals=False)
    assert [r.name for r in runs] == ["k2_architecturetopk", "k4_architecturetopk"]
    st = json.loads((tmp_path / "sw/checkpoints/step_00000020/state.json").read_text())
    assert st["store"]["batches"] == 20 and st["n_saes"] == 2
    assert [load_sae(r).cfg.k for r in runs] == [2, 4]


# --- end to end on a tiny LM cache, through the CLI ---------------------------------------------

@pytest.fixture(scope="module")
def lm_cache(tmp_path_factory, tiny_qwen, tiny_qwen_ft):
    from saediff.cache.writer import CacheConfig, build_cache

    d = tmp_path_factory.mktemp("lmcache")
    tiny.write_chat_jsonl(d / "chat.jsonl")
    return build_cache(CacheConfig(base=str(tiny_qwen), finetuned=str(tiny_qwen_ft), layer=1,
                                   dataset=str(d / "chat.jsonl"), prompt_field="p",
                                   response_field="r", out=str(d / "c.h5"), dtype="float32",
                                   max_tokens=3000))


def test_cli_toy_config_writes_evals_per_source(lm_cache, tmp_path):
    from sae_lens import SAE

    from saediff.cli import main

    out = tmp_path / "run"
    rc = main(["train", "--config", str(ROOT / "configs/toy_topk.yaml"), "--cache", str(lm_cache),
               "--out", str(out), "--total-tokens", "6000", "--batch-size", "256",
               "--d-sae", "128", "--k", "4", "--eval-sequences", "8", "--eval-fraction", "0.2"])
    assert rc == 0
    ev = json.loads((out / "evals.json").read_text())
    assert set(ev) == {"base", "finetuned"}
    for r in ev.values():
        for key in ("fvu", "l0", "dead_frac", "delta_loss", "kl"):
            assert r[key] is not None and np.isfinite(r[key]), (key, r)
        assert r["kl"] >= 0 and r["n_lm_tokens"] > 0
    assert SAE.load_from_disk(out).cfg.metadata.layer == 1
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert {"step", "loss", "l0", "dead_frac"} <= set(json.loads(lines[-1]))
    assert (out / "curves.html").stat().st_size > 10_000
    assert json.loads((out / "train_config.json").read_text())["d_sae"] == 128
