"""Data-parallel training under torchrun (gloo, 2 CPU processes) equals 1-rank training."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from saediff.dist import Dist
from saediff.errors import SaediffError
from saediff.train.ddp import DataParallel
from saediff.train.loop import TrainConfig, train

from test_train import write_array_cache

ROOT = Path(__file__).resolve().parents[2]
STEPS = 12


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args: list[str], tmp: Path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), *args]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}",
           "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=tmp)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    rng = np.random.default_rng(0)
    # a few strong directions + noise, so latents die and revive (exercises the aux loss and
    # the all-reduced dead-latent tracking)
    x = (rng.normal(size=(4096, 8)) @ rng.normal(size=(8, 16)) * 3
         + rng.normal(size=(4096, 16)) * 0.3 + 1.0).astype(np.float32)
    cache = write_array_cache(tmp / "c.h5", {"base": x, "finetuned": x[::-1].copy()})
    cfg = {"cache": [str(cache)], "d_sae": 64, "k": 4, "total_tokens": STEPS * 256,
           "batch_size": 256, "lr": 3e-3, "checkpoint_every": 4, "log_every": 2,
           "eval_sequences": 0, "eval_rows": 512, "norm_batches": 2, "buffer_rows": 2048,
           "dead_feature_window": 3, "threads": 1, "seed": 3}
    yml = tmp / "cfg.yaml"
    yml.write_text(yaml.safe_dump(cfg))
    (one,) = train(TrainConfig(**cfg, out=str(tmp / "one")), evals=False)
    return tmp, cfg, yml, one


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "sae_weights.safetensors")


def _assert_same(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert set(wa) == set(wb)
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5, rtol=1e-4), \
            (k, (wa[k] - wb[k]).abs().max().item())
    # the weights moved away from their initialisation: equality is not trivial
    la = [json.loads(ln) for ln in (a / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(ln) for ln in (b / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in la] == [r["step"] for r in lb]
    for ra, rb in zip(la, lb):
        for key in ("loss", "mse_loss", "l0", "dead_frac", "tokens"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-4, abs=1e-6), (key, ra, rb)
    assert la[0]["mse_loss"] > 1.1 * la[-1]["mse_loss"]
    assert any(r["aux_loss"] > 0 for r in la), "no dead latents: aux loss not exercised"


def test_two_ranks_equal_one_rank(setup):
    tmp, _, yml, one = setup
    two = tmp / "two"
    _torchrun(["-m", "saediff", "train", "--config", str(yml), "--out", str(two), "--no-evals"],
              tmp)
    _assert_same(one, two)
    meta = json.loads((two / "cfg.json").read_text())["metadata"]
    assert meta["saediff_world_size"] == 2
    assert json.loads((one / "cfg.json").read_text())["metadata"]["saediff_world_size"] == 1


def test_two_rank_run_stopped_then_resumed_equals_one_rank(setup):
    tmp, cfg, yml, one = setup
    out = tmp / "resumed"
    stop = tmp / "stop.py"   # a 2-rank run interrupted after step 6 (checkpoint at 4)
    stop.write_text("import yaml\nfrom saediff.train.loop import TrainConfig, train\n"
                    f"cfg = TrainConfig(**yaml.safe_load(open({str(yml)!r})), out={str(out)!r})\n"
                    "train(cfg, evals=False, stop_after=6)\n")
    _torchrun([str(stop)], tmp)
    assert json.loads((out / "checkpoints" / "latest.json").read_text())["step"] == 4
    assert not (out / "sae_weights.safetensors").exists()
    _torchrun(["-m", "saediff", "train", "--config", str(yml), "--out", str(out), "--no-evals"],
              tmp)
    _assert_same(one, out)


def test_global_batch_must_split_evenly():
    with pytest.raises(SaediffError, match=r"--batch-size 256 .* divisible by the number of "
                                           r"ranks \(3\)"):
        DataParallel(Dist(0, 3), 256, "cpu")
    dp = DataParallel(Dist(1, 4), 8, "cpu")
    batch = torch.arange(16, dtype=torch.float64).reshape(8, 2)
    got = dp.local(batch)
    assert got.dtype == torch.float32 and torch.equal(got, batch[2:4].float())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_training_matches_cpu(setup):
    tmp, cfg, _, one = setup
    (gpu,) = train(TrainConfig(**{**cfg, "device": "cuda"}, out=str(tmp / "gpu")), evals=False)
    wa, wb = _weights(one), _weights(gpu)
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-3, rtol=1e-3), k


def test_crosscoder_two_ranks_equal_one_rank(setup):
    """A crosscoder under torchrun (the one loop's checkpoints included): BatchTopK over the
    global batch, so 2 ranks give the 1-rank weights, threshold, curve (dead latents and the
    auxiliary loss included) and evals."""
    tmp, cfg, _, _ = setup
    cc = {**cfg, "architecture": "crosscoder", "d_sae": 64, "k": 2}
    yml = tmp / "cc.yaml"
    yml.write_text(yaml.safe_dump(cc))
    (one,) = train(TrainConfig(**cc, out=str(tmp / "cc_one")))
    two = tmp / "cc_two"
    _torchrun(["-m", "saediff", "train", "--config", str(yml), "--out", str(two)], tmp)
    wa = load_file(one / "crosscoder.safetensors")
    wb = load_file(two / "crosscoder.safetensors")
    assert set(wa) == set(wb) and "threshold" in wa
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5, rtol=1e-4), \
            (k, (wa[k] - wb[k]).abs().max().item())
    la = [json.loads(ln) for ln in (one / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(ln) for ln in (two / "metrics.jsonl").read_text().splitlines()]
    for ra, rb in zip(la, lb, strict=True):
        for key in ("loss", "aux_loss", "l0", "dead_frac"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-4, abs=1e-6), (key, ra, rb)
    mse = [r["loss"] - r["aux_loss"] for r in la]
    assert mse[-1] < mse[0]  # it trained
    assert any(r["aux_loss"] > 0 for r in la), "no dead latents: aux loss not exercised"
    ea, eb = (json.loads((r / "evals.json").read_text()) for r in (one, two))
    assert ea["base"]["fvu"] == pytest.approx(eb["base"]["fvu"], rel=1e-4)


def test_batchtopk_two_ranks_equal_one_rank(setup):
    """BatchTopK SAE (sparse step): the global batch's top k*B, so 2 ranks == 1 rank."""
    tmp, cfg, _, _ = setup
    bt = {**cfg, "architecture": "batchtopk", "checkpoint_every": 0}
    yml = tmp / "bt.yaml"
    yml.write_text(yaml.safe_dump(bt))
    (one,) = train(TrainConfig(**bt, out=str(tmp / "bt_one")), evals=False)
    two = tmp / "bt_two"
    _torchrun(["-m", "saediff", "train", "--config", str(yml), "--out", str(two), "--no-evals"],
              tmp)
    _assert_same(one, two)
