"""Crosscoders through the one training loop: SIGKILL resume, estimate_scale, the NaN guard,
sweeps, --live --layers, and no second loop in the package."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from saediff.errors import SaediffError
from saediff.sae import Crosscoder, load_sae
from saediff.train.data import estimate_scale
from saediff.train.loop import TrainConfig, train
from saediff.train.trainer import TensorStore

import tiny
from test_train import write_array_cache

ROOT = Path(__file__).resolve().parents[2]


def _pairs(n: int = 6000, d: int = 16, seed: int = 0) -> torch.Tensor:
    """[n, 2, d] (base, fine-tuned) rows: shared low-rank structure, one extra fine-tuned
    direction, raw norm far from sqrt(d) (so the input scale matters)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 6, generator=g).relu()
    basis = torch.randn(6, d, generator=g)
    xb = z @ basis + 0.1 * torch.randn(n, d, generator=g)
    xf = xb + (torch.rand(n, 1, generator=g) < 0.1) * basis[0] * 2
    return torch.stack([xb, xf], 1) * 9.0 + 1.0


def _cfg(out: Path, **kw) -> TrainConfig:
    base = dict(cache=[str(out.parent / "absent.h5")], out=str(out), architecture="crosscoder",
                d_sae=32, k=2, total_tokens=40 * 128, batch_size=128, lr=3e-3,
                checkpoint_every=10, log_every=5, norm_batches=3, dead_feature_window=5,
                threads=1)
    base.update(kw)
    return TrainConfig(**base)


def _same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(a / "crosscoder.safetensors"), load_file(b / "crosscoder.safetensors")
    assert set(wa) == set(wb) and "threshold" in wa
    assert all(torch.equal(wa[k], wb[k]) for k in wa), \
        [k for k in wa if not torch.equal(wa[k], wb[k])]


@pytest.fixture(scope="module")
def paired_cache(tmp_path_factory):
    x = _pairs(8000).numpy()
    return write_array_cache(tmp_path_factory.mktemp("cc") / "pairs.h5",
                             {"base": x[:, 0].copy(), "finetuned": x[:, 1].copy()})


# --- resume ---------------------------------------------------------------------------------

def test_crosscoder_resume_after_sigkill_is_bitwise_identical(paired_cache, tmp_path):
    """`saediff train` of a crosscoder killed mid-run, rerun: the same weights (threshold,
    dead-latent counters, Adam state and store position all restored) and the same log."""
    cfg = {"cache": [str(paired_cache)], "architecture": "crosscoder", "d_sae": 32, "k": 2,
           "total_tokens": 600 * 128, "batch_size": 128, "checkpoint_every": 25,
           "eval_rows": 512, "buffer_rows": 2048, "norm_batches": 2, "dead_feature_window": 10,
           "threads": 1, "lr": 3e-3}
    killed, rerun = tiny.kill_train_mid_run(cfg, tmp_path, "crosscoder.safetensors", 50)
    assert rerun() == 0
    whole = tmp_path / "whole"                        # same config, uninterrupted, in-process
    train(TrainConfig(**cfg, out=str(whole)), evals=False)
    _same_weights(killed, whole)
    assert (killed / "metrics.jsonl").read_text() == (whole / "metrics.jsonl").read_text()
    assert isinstance(load_sae(killed), Crosscoder)
    lines = [json.loads(ln) for ln in (whole / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["step"] == 600 and lines[-1]["loss"] < lines[0]["loss"]


def test_crosscoder_stopped_and_resumed_equals_whole(tmp_path):
    data = _pairs()
    whole = train(_cfg(tmp_path / "whole"), evals=False, store=TensorStore(data, 128))[0]
    train(_cfg(tmp_path / "split"), evals=False, store=TensorStore(data, 128), stop_after=23)
    st = json.loads((tmp_path / "split/checkpoints/latest.json").read_text())
    assert st["step"] == 20 and not (tmp_path / "split/crosscoder.safetensors").exists()
    (split,) = train(_cfg(tmp_path / "split"), evals=False, store=TensorStore(data, 128))
    _same_weights(whole, split)
    assert (whole / "metrics.jsonl").read_text() == (split / "metrics.jsonl").read_text()


# --- the input scale ------------------------------------------------------------------------

def test_crosscoder_uses_estimate_scale_and_folds_it(tmp_path):
    """The scale is `train.data.estimate_scale`'s (what every SAE gets), recorded in the
    checkpoint and metadata; the saved crosscoder on raw x equals the trained one on x*scale."""
    data = _pairs()
    cfg = _cfg(tmp_path / "r", checkpoint_every=40)
    (run,) = train(cfg, evals=False, store=TensorStore(data, 128))
    want = estimate_scale(cfg, TensorStore(data, 128), 16)
    cc = load_sae(run)
    assert cc.cfg.metadata["saediff_input_scale"] == want
    ck = run / "checkpoints" / json.loads((run / "checkpoints/latest.json").read_text())["dir"]
    assert json.loads((ck / "state.json").read_text())["scale"] == want
    assert want == pytest.approx(4.0 / data.norm(dim=-1).mean().item(), rel=0.1)
    trained = Crosscoder(cc.cfg)
    trained.load_state_dict({k[4:]: v for k, v in load_file(ck / "sae0.safetensors").items()
                             if k.startswith("sae.")})
    trained.threshold.copy_(cc.threshold * want)  # the learned threshold, trained scale
    xb, xf = data[:300, 0], data[:300, 1]
    with torch.no_grad():
        f_raw, rb, rf = cc(xb, xf)
        f_tr, tb, tf = trained(xb * want, xf * want)
    assert torch.allclose(f_raw, f_tr, atol=1e-4) and torch.allclose(rb, tb / want, atol=1e-3)
    assert (f_raw > 0).float().sum(-1).mean() > 0.5  # latents fire: equality is not trivial


def test_crosscoder_without_normalize_records_no_scale(tmp_path):
    (run,) = train(_cfg(tmp_path / "r", normalize=False, total_tokens=10 * 128),
                   evals=False, store=TensorStore(_pairs(), 128))
    assert load_sae(run).cfg.metadata["saediff_input_scale"] is None


# --- the NaN guard --------------------------------------------------------------------------

class _NaNPairs:
    d_model = 8

    def __init__(self, bad_step: int):
        self.i, self.bad = 0, bad_step

    def __next__(self):
        x = torch.randn(64, 2, 8, generator=torch.Generator().manual_seed(self.i)) * 3
        if self.i == self.bad:
            x[3, 1, 2] = float("nan")
        self.i += 1
        return x

    def peek_batches(self, n):
        return [torch.randn(64, 2, 8, generator=torch.Generator().manual_seed(99))]

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, st):
        self.i = st["i"]


def test_crosscoder_nan_loss_names_the_step_and_keeps_last_checkpoint(tmp_path):
    cfg = _cfg(tmp_path / "r", d_sae=16, total_tokens=20 * 64, batch_size=64, checkpoint_every=5)
    with pytest.raises(SaediffError, match=r"non-finite loss at step 7 \(loss = nan\).*last good "
                                           r"checkpoint: step 5"):
        train(cfg, evals=False, store=_NaNPairs(bad_step=7))
    latest = json.loads((tmp_path / "r/checkpoints/latest.json").read_text())
    assert latest["step"] == 5
    w = load_file(tmp_path / "r/checkpoints" / latest["dir"] / "sae0.safetensors")
    assert all(torch.isfinite(v.float()).all() for v in w.values())
    assert not (tmp_path / "r/crosscoder.safetensors").exists()


# --- what the one loop now gives crosscoders too --------------------------------------------

def test_crosscoder_sweep_equals_single_runs(tmp_path):
    """A sweep trains every crosscoder on the same batches: each equals its own single run."""
    data = _pairs()
    runs = train(_cfg(tmp_path / "sweep", sweep={"k": [1, 3]}, total_tokens=15 * 128),
                 evals=False, store=TensorStore(data, 128))
    assert [r.name for r in runs] == ["k1", "k3"]
    for run, k in zip(runs, (1, 3)):
        (one,) = train(_cfg(tmp_path / f"one{k}", k=k, total_tokens=15 * 128), evals=False,
                       store=TensorStore(data, 128))
        _same_weights(run, one)
    with pytest.raises(SaediffError, match="sweep crosscoders and SAEs in separate runs"):
        _cfg(tmp_path / "mixed", sweep={"architecture": ["topk", "crosscoder"]})


def test_crosscoder_cache_run_writes_evals_and_curves(paired_cache, tmp_path):
    (run,) = train(_cfg(tmp_path / "r", cache=[str(paired_cache)], total_tokens=20 * 128,
                        eval_rows=512, buffer_rows=2048))
    ev = json.loads((run / "evals.json").read_text())
    assert set(ev) == {"base", "finetuned"} and ev["base"]["tokens"] == 512
    assert 0 < ev["base"]["fvu"] < 1 and 0 < ev["finetuned"]["fvu"] < 1
    assert "plotly" in (run / "curves.html").read_text()[:5000].lower()
    meta = json.loads((run / "cfg.json").read_text())["metadata"]
    assert meta["layer"] == 1 and meta["saediff_models"]["finetuned"]["name"] == "synthetic"


def test_crosscoder_refuses_an_unpaired_cache(tmp_path):
    x = np.random.default_rng(0).normal(size=(1024, 8)).astype(np.float32)
    cache = write_array_cache(tmp_path / "one.h5", {"base": x})
    with pytest.raises(SaediffError, match=r"a crosscoder needs a paired cache .*\['base'\]"):
        train(_cfg(tmp_path / "r", cache=[str(cache)], sources={"base": 1.0}), evals=False)
    assert not list(tmp_path.glob("r/*"))  # refused before any run file


def test_live_layers_crosscoders_equal_single_layer_runs(tmp_path, tiny_qwen, tiny_qwen_ft):
    """--live --layers 0,2 --architecture crosscoder: per layer the crosscoder of a live
    --layer run, from one model forward per LM batch (the refusal is lifted)."""
    tiny.write_chat_jsonl(tmp_path / "chat.jsonl")
    cfg = dict(live=True, base=str(tiny_qwen), finetuned=str(tiny_qwen_ft),
               dataset=str(tmp_path / "chat.jsonl"), prompt_field="p", response_field="r",
               architecture="crosscoder", out=str(tmp_path / "multi"), d_sae=64, k=2,
               total_tokens=15 * 128, batch_size=128, buffer_tokens=600, lr=3e-3,
               checkpoint_every=10, norm_batches=2, dead_feature_window=5, eval_rows=256,
               eval_sequences=0, threads=1)
    runs = train(TrainConfig(**{**cfg, "layers": "0,2"}))
    assert [r.name for r in runs] == ["layer_0", "layer_2"]
    (single,) = train(TrainConfig(**{**cfg, "layer": 2, "out": str(tmp_path / "single")}),
                      evals=False)
    a, b = (load_file(r / "crosscoder.safetensors") for r in (runs[1], single))
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), (k, (a[k] - b[k]).abs().max())
    for layer, run in zip((0, 2), runs):
        cc = load_sae(run)
        assert cc.cfg.metadata["hook_name"] == f"blocks.{layer}.hook_resid_post"
        assert json.loads((run / "evals.json").read_text())["base"]["tokens"] > 50
    w0, w2 = (load_file(r / "crosscoder.safetensors")["W_dec"] for r in runs)
    assert not torch.allclose(w0, w2, atol=1e-3)  # the layers differ: equality is not trivial


def test_no_second_training_loop():
    """In train/ only the registered trainers step an optimizer, and only `train.loop`
    drives trainers and writes checkpoints (grep-level)."""
    pkg = ROOT / "saediff"
    steppers = sorted(str(p.relative_to(pkg)) for p in (pkg / "train").rglob("*.py")
                      if re.search(r"\.step\(\)", p.read_text().replace("scheduler.step()", "")))
    assert steppers == ["train/crosscoder_trainer.py", "train/trainer.py"], steppers
    drivers = sorted(str(p.relative_to(pkg)) for p in pkg.rglob("*.py")
                     if re.search(r"save_checkpoint\(|\.step\(batch", p.read_text())
                     and p.name != "trainer.py")
    assert drivers == ["train/loop.py"], drivers
