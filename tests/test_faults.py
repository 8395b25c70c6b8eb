"""Faults and bad input (issue 15): no silent corruption, no tracebacks for user mistakes.

One test per case of the issue's list. Write faults are injected at random points (a failing
`h5py.File.flush`, a failing space reservation, and a real file-size limit in a subprocess);
every run must end in one clear error, never in a complete-looking file with wrong contents,
and a rerun must equal an uninterrupted run.
"""
from __future__ import annotations

import json
import math
import os
import random
import resource
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from saediff.cache.format import open_cache, partial_path, verify_cache
from saediff.cache.store import ActivationStore
from saediff.cache.writer import CacheConfig, CacheWriteError, build_cache
from saediff.errors import SaediffError

import tiny

DATASETS = ("tokens", "seq_ids", "doc_ids", "positions", "roles", "seq_offsets", "progress")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    rng = random.Random(0)
    p = tmp_path_factory.mktemp("fdata") / "docs.jsonl"
    with p.open("w") as fh:
        for _ in range(60):
            fh.write(json.dumps({"text": " ".join(rng.choices(tiny.WORDS, k=40))}) + "\n")
    return p


def _cfg(model: Path, data: Path, out: Path, **kw) -> CacheConfig:
    kw = {"layer": 1, "max_tokens": 1200, "ctx_len": 32, "batch_size": 4, "dtype": "float32",
          **kw}
    return CacheConfig(base=str(model), dataset=str(data), out=str(out), **kw)


def _arrays(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        n = int(f["progress"][0])
        out = {k: f[k][: n if k != "seq_offsets" and k != "progress" else None] for k in DATASETS}
        out.update({f"acts/{s}": f["acts"][s][:n] for s in f["acts"]})
    return out


def _same(a: Path, b: Path) -> bool:
    x, y = _arrays(a), _arrays(b)
    return x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_qwen, tiny_qwen_ft, data) -> Path:
    out = tmp_path_factory.mktemp("ref") / "ref.h5"
    return build_cache(_cfg(tiny_qwen, data, out, finetuned=str(tiny_qwen_ft)))


# --- 1. write faults while caching ------------------------------------------------------------

@pytest.mark.parametrize("trial", range(4))
def test_injected_flush_failure_then_resume_equals_uninterrupted(tmp_path, monkeypatch, trial,
                                                                tiny_qwen, tiny_qwen_ft, data,
                                                                reference):
    fail_at = random.Random(trial).randrange(1, 30)  # the n-th flush of the run fails
    calls = {"n": 0}
    real_flush = h5py.File.flush

    def flaky(self):
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise OSError(28, "No space left on device")
        return real_flush(self)

    cfg = _cfg(tiny_qwen, data, tmp_path / "c.h5", finetuned=str(tiny_qwen_ft))
    monkeypatch.setattr(h5py.File, "flush", flaky)
    with pytest.raises(CacheWriteError, match=r"cannot write .*c\.h5\.partial: No space left"):
        build_cache(cfg)
    monkeypatch.setattr(h5py.File, "flush", real_flush)
    assert not (tmp_path / "c.h5").exists()  # nothing complete-looking
    assert partial_path(tmp_path / "c.h5").exists()  # the committed prefix is kept
    build_cache(cfg)
    assert _same(tmp_path / "c.h5", reference) and verify_cache(tmp_path / "c.h5") == []


def test_reservation_failure_writes_nothing_and_resumes(tmp_path, monkeypatch, tiny_qwen,
                                                        tiny_qwen_ft, data, reference):
    calls = {"n": 0}
    real = os.posix_fallocate

    def full(fd, off, n):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device")
        return real(fd, off, n)

    cfg = _cfg(tiny_qwen, data, tmp_path / "c.h5", finetuned=str(tiny_qwen_ft))
    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(CacheWriteError, match="No space left on device; free space"):
        build_cache(cfg)
    monkeypatch.setattr(os, "posix_fallocate", real)
    with h5py.File(partial_path(tmp_path / "c.h5"), "r") as f:
        assert int(f["progress"][0]) > 0 and not f["progress"][2]
    build_cache(cfg)
    assert _same(tmp_path / "c.h5", reference)


def _limited(limit: int):
    def pre() -> None:  # a full disk, as far as this process is concerned
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    return pre


def _cache_cli(out: Path, model: Path, data: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "saediff", "cache", "--base", str(model), "--layer", "1",
            "--dataset", str(data), "--out", str(out), "--ctx-len", "32", "--dtype", "float32",
            *extra]


def _fails_once_after_a_commit(args: list[str], cause: str, **kw) -> None:
    """Run the CLI: one line naming `cause`, exit 2, nothing under the final name, and the
    partial holds at least one commit."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    r = subprocess.run(args, capture_output=True, text=True, env=env, timeout=120, **kw)
    assert r.returncode == 2, r.stderr[-2000:]
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("saediff")]
    assert len(err) == 1 and cause in err[0] and "Traceback" not in r.stderr
    out = Path(args[args.index("--out") + 1])
    assert not out.exists()
    with h5py.File(partial_path(out), "r") as f:
        assert int(f["progress"][0]) > 0  # it failed after at least one commit


def test_file_size_limit_in_subprocess_one_line_exit2_then_resume(tmp_path, tiny_qwen, data):
    out = tmp_path / "c.h5"
    args = _cache_cli(out, tiny_qwen, data, "--max-tokens", "2400", "--batch-size", "16")
    _fails_once_after_a_commit(args, "File too large",
                               preexec_fn=_limited(1_000_000))  # room for one batch, not two
    build_cache(_cfg(tiny_qwen, data, out, max_tokens=2400, batch_size=16))
    ref = build_cache(_cfg(tiny_qwen, data, tmp_path / "ref.h5", max_tokens=2400, batch_size=16))
    assert _same(out, ref) and verify_cache(out) == []


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                       capture_output=True)
    return r.returncode == 0


def test_real_disk_full_tmpfs_one_line_exit2_then_resume(tmp_path, tiny_qwen, tiny_qwen_ft, data,
                                                         reference):
    """The issue's own reproduction: a tiny tmpfs as the output dir (needs root to mount)."""
    mnt = tmp_path / "tmpfs"
    if os.geteuid() != 0 or not _mount_tmpfs(mnt, "1200k"):
        pytest.skip("mounting a tmpfs needs root (and a kernel that allows it)")
    try:
        out = mnt / "c.h5"
        args = _cache_cli(out, tiny_qwen, data, "--finetuned", str(tiny_qwen_ft),
                          "--max-tokens", "1200", "--batch-size", "4")
        _fails_once_after_a_commit(args, "No space left on device")
        subprocess.run(["mount", "-o", "remount,size=64m", str(mnt)], check=True)  # free space
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        r = subprocess.run(args, capture_output=True, text=True, env=env, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        assert _same(out, reference) and verify_cache(out) == []
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


# --- 2. --overwrite keeps the old cache until the new one is complete --------------------------

def test_overwrite_keeps_old_cache_when_new_run_fails(tmp_path, tiny_qwen, data):
    out = build_cache(_cfg(tiny_qwen, data, tmp_path / "c.h5", max_tokens=200))
    before = _arrays(out)
    with pytest.raises(SaediffError, match="has no field 'nope'"):
        build_cache(_cfg(tiny_qwen, data, out, max_tokens=300, text_field="nope", overwrite=True))
    after = _arrays(out)
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert not partial_path(out).exists()


# --- 3. corruption is detected -----------------------------------------------------------------

def _flip(path: Path, dataset: str, row: int) -> None:
    with h5py.File(path, "r") as f:
        d = f[dataset]
        off = d.id.get_chunk_info_by_coord((row // d.chunks[0] * d.chunks[0],)
                                           + (0,) * (d.ndim - 1)).byte_offset
        row_bytes = d.dtype.itemsize * int(np.prod(d.shape[1:]))
    with open(path, "r+b") as fh:  # 4 KiB of flipped bits inside the chunk
        fh.seek(off + (row % d.chunks[0]) * row_bytes)
        b = bytearray(fh.read(4096))
        fh.seek(off + (row % d.chunks[0]) * row_bytes)
        fh.write(bytes(x ^ 0x55 for x in b))


def test_flipped_bytes_are_read_errors_and_verify_problems(tmp_path, reference):
    p = tmp_path / "c.h5"
    p.write_bytes(reference.read_bytes())
    _flip(p, "acts/finetuned", 100)
    with open_cache(p) as c:  # structure is intact; the activations are not
        with pytest.raises(SaediffError, match=r"acts/finetuned are corrupt .*rebuild"):
            c.activations("finetuned", 0, 200)
        assert c.activations("base", 0, 200).shape == (200, 32)
    problems = verify_cache(p)
    assert len(problems) == 1 and "acts/finetuned" in problems[0]
    store = ActivationStore(p, sources=["finetuned"], batch_size=64, buffer_rows=512)
    with pytest.raises(SaediffError, match="corrupt"):
        next(iter(store))


def test_verify_checks_token_range_roles_positions(tmp_path, reference):
    for name, value, msg in (("tokens", -3, "token id -3 at row 7 is outside the vocabulary"),
                             ("tokens", 10_000, "token id 10000 at row 7"),
                             ("roles", 9, "invalid role codes"),
                             ("positions", 99, "positions disagree")):
        p = tmp_path / f"{name}{value}.h5"
        p.write_bytes(reference.read_bytes())
        with h5py.File(p, "a") as f:  # rewritten through HDF5: checksums stay valid
            f[name][7] = value
        problems = verify_cache(p)
        assert any(msg in m for m in problems), (name, problems)
        assert verify_cache(reference) == []


def test_partial_cache_refused_unless_allowed(tmp_path, tiny_qwen, data, monkeypatch):
    cfg = _cfg(tiny_qwen, data, tmp_path / "c.h5")
    real_flush, calls = h5py.File.flush, {"n": 0}

    def flaky(self):
        calls["n"] += 1
        if calls["n"] == 7:
            raise OSError(5, "Input/output error")
        return real_flush(self)

    monkeypatch.setattr(h5py.File, "flush", flaky)
    with pytest.raises(CacheWriteError):
        build_cache(cfg)
    monkeypatch.setattr(h5py.File, "flush", real_flush)
    part = partial_path(tmp_path / "c.h5")
    for p in (tmp_path / "c.h5", part):
        with pytest.raises(SaediffError, match="(not complete|incomplete).*--allow-partial"):
            open_cache(p)
        with pytest.raises(SaediffError, match="--allow-partial"):
            ActivationStore(p, sources=["base"], batch_size=8)
    from saediff.train.loop import TrainConfig, check_caches
    with pytest.raises(SaediffError, match="--allow-partial"):
        check_caches(TrainConfig(cache=[str(part)], sources={"base": 1.0}, d_sae=64, k=4,
                                 batch_size=8, total_tokens=64))
    with open_cache(part, allow_partial=True) as c:
        assert 0 < c.rows < 1200 and not c.complete


# --- 4. non-finite steering values -------------------------------------------------------------

@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_nonfinite_clamp_add_coefs_refused(value, tiny_qwen):
    from saediff.steer.evaluate import SteerConfig
    from saediff.steer.sweep import SweepConfig

    base = dict(model=str(tiny_qwen), prompts="x.txt", sae="s", latent=[0])
    for kw in ({"clamp": value}, {"add": value}, {"temperature": value}):
        with pytest.raises(SaediffError, match="finite"):
            SteerConfig(**base, **kw)
    with pytest.raises(SaediffError, match="--coefs must be finite"):
        SweepConfig(**base, coefs=[1.0, value])


def test_steer_hooks_refuse_nonfinite_and_wrong_layer(tiny_qwen):
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    from saediff import steer
    from saediff.models import load_model

    lm = load_model(tiny_qwen)
    sae = StandardSAE(StandardSAEConfig(d_in=32, d_sae=16,
                                        metadata=SAEMetadata(hook_name="blocks.0.hook_resid_post")))
    with pytest.raises(SaediffError, match="finite"):
        with steer(lm, sae, 3, clamp=float("nan")):
            pass
    with pytest.raises(SaediffError, match="layer 2 does not match the SAE's layer 0"):
        with steer(lm, sae, 3, clamp=1.0, layer=2):
            pass


# --- 5. ordinary OS errors and bad files: one line, exit 2 -------------------------------------

def _cli(argv: list[str], capsys) -> tuple[int, str]:
    from saediff.cli import main

    rc = main(argv)
    err = capsys.readouterr().err.strip()
    return rc, err


def test_cli_user_errors_are_one_line_exit_2(tmp_path, capsys, tiny_qwen, data):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("cache: [a.h5\nd_sae: 3\n")
    tag_yaml = tmp_path / "tag.yaml"
    tag_yaml.write_text("d_sae: !!python/object/apply:os.system ['touch pwned']\n")
    file_in_the_way = tmp_path / "file"
    file_in_the_way.write_text("x")
    cases = [
        (["train", "--config", str(bad_yaml)], f"{bad_yaml}:2"),
        (["train", "--config", str(tag_yaml)], "invalid YAML"),
        (["cache", "--base", str(tiny_qwen), "--layer", "1", "--dataset", str(data),
          "--out", str(tmp_path)], "is a directory; give a file path"),
        (["cache", "--base", str(tiny_qwen), "--layer", "1", "--dataset", str(data),
          "--out", str(file_in_the_way / "c.h5")], "is not a directory"),
        (["cache", "--base", str(tmp_path / "no" / "model"), "--layer", "1", "--dataset",
          str(data), "--out", str(tmp_path / "c.h5")], "model directory not found"),
        (["cache", "--base", str(tiny_qwen), "--layer", "1", "--dataset", str(data),
          "--out", str(tmp_path / "c.h5"), "--ctx-len", "999"], "exceeds the 256 positions"),
    ]
    for argv, msg in cases:
        rc, err = _cli(argv, capsys)
        lines = [ln for ln in err.splitlines() if ln.startswith("saediff")]
        assert rc == 2 and len(lines) == 1 and msg in lines[0], (argv, err)
        assert "Traceback" not in err
    assert not Path("pwned").exists()


def test_gpt2_ctx_len_above_n_positions(tmp_path, tiny_gpt2, data):
    with pytest.raises(SaediffError, match="--ctx-len 300 exceeds the 256 positions"):
        build_cache(_cfg(tiny_gpt2, data, tmp_path / "c.h5", ctx_len=300))
    assert not any(tmp_path.glob("c.h5*[!k]"))  # no cache, no partial (only the lock file)


def test_pickle_checkpoint_and_sae_are_one_line_errors(tmp_path):
    from saediff.sae import load_sae
    from saediff.train.trainer import load_checkpoint

    run = tmp_path / "run"
    (run / "checkpoints" / "step_1").mkdir(parents=True)
    torch.save({"W": torch.zeros(2)}, run / "checkpoints" / "step_1" / "sae0.safetensors")
    (run / "checkpoints" / "step_1" / "state.json").write_text(json.dumps({"n_saes": 1}))
    (run / "checkpoints" / "latest.json").write_text(json.dumps({"step": 1, "dir": "step_1"}))

    class T:  # load_checkpoint only needs the count of trainers before reading weights
        pass
    with pytest.raises(SaediffError, match="step_1 is unreadable"):
        load_checkpoint(run, [T()], store=None)
    from sae_lens import StandardSAE, StandardSAEConfig
    StandardSAE(StandardSAEConfig(d_in=4, d_sae=8)).save_model(run)
    torch.save({"W": torch.zeros(2)}, run / "sae_weights.safetensors")  # a pickle in its place
    with pytest.raises(SaediffError, match="not a readable safetensors file"):
        load_sae(run)


def test_k_above_d_sae_and_too_few_tokens_refused_before_any_dir(tmp_path):
    from saediff.train.loop import TrainConfig

    with pytest.raises(SaediffError, match=r"k \(32\) must be <= d_sae \(16\)"):
        TrainConfig(out=str(tmp_path / "run"), d_sae=16, k=32)
    with pytest.raises(SaediffError, match="total_tokens .* less than one batch"):
        TrainConfig(out=str(tmp_path / "run"), total_tokens=100, batch_size=4096)
    with pytest.raises(SaediffError, match="finite"):
        TrainConfig(out=str(tmp_path / "run"), lr=float("nan"))
    with pytest.raises(SaediffError, match="must be <= d_sae"):  # each sweep combination too
        from saediff.train.loop import expand_sweep
        expand_sweep(TrainConfig(out=str(tmp_path / "run"), d_sae=16, k=8, sweep={"k": [8, 64]}))
    assert not (tmp_path / "run").exists()


# --- 6. path escapes ---------------------------------------------------------------------------

def test_latest_json_cannot_leave_the_run_dir(tmp_path):
    from saediff.train.trainer import load_checkpoint

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    for ref in ("../../elsewhere", "/etc", str(tmp_path / "elsewhere")):
        (run / "checkpoints" / "latest.json").write_text(json.dumps({"step": 1, "dir": ref}))
        with pytest.raises(SaediffError, match="would leave"):
            load_checkpoint(run, [], store=None)


def test_sweep_names_cannot_leave_out(tmp_path, reference):
    from saediff.train.loop import TrainConfig, train

    cfg = TrainConfig(cache=[str(reference)], out=str(tmp_path / "runs"), sources={"base": 1.0},
                      d_sae=16, k=4, batch_size=16, total_tokens=32, eval_sequences=0,
                      sweep={"lr_scheduler": ["constant", "/../../escaped"]}, checkpoint_every=0)
    with pytest.raises(SaediffError, match="would leave"):
        train(cfg)
    assert not (tmp_path / "escaped").exists() and not (tmp_path.parent / "escaped").exists()
    from saediff.io import safe_child
    with pytest.raises(SaediffError, match="would leave"):
        safe_child(tmp_path / "runs", "k8_../../../x", "sweep run name")


# --- 7. smaller items ----------------------------------------------------------------------------

def test_non_utf8_names_file_and_line_and_leaves_no_partial(tmp_path, tiny_qwen, data):
    bad = tmp_path / "bad.jsonl"
    lines = data.read_bytes().splitlines(keepends=True)
    bad.write_bytes(b"".join(lines[:30]) + b'{"text": "caf\xe9 money"}\n' + b"".join(lines[30:]))
    with pytest.raises(SaediffError, match=r"bad\.jsonl line 31: not UTF-8"):
        build_cache(_cfg(tiny_qwen, bad, tmp_path / "c.h5"))
    assert not (tmp_path / "c.h5").exists() and not partial_path(tmp_path / "c.h5").exists()


def test_nan_reports_the_position_where_it_enters(tmp_path, tiny_qwen):
    from saediff.models import load_model

    lm = load_model(tiny_qwen)
    with torch.no_grad():  # every occurrence of "bank" embeds as NaN
        lm.model.model.embed_tokens.weight[tiny.WORDS.index("bank") + len(tiny.SPECIALS)] = math.nan
    p = tmp_path / "d.jsonl"
    good = [json.dumps({"text": "you save money every day ."})] * 12
    p.write_text("\n".join(good + [json.dumps({"text": "you save money in the bank ."})]) + "\n")
    with pytest.raises(SaediffError, match=r"NaN/inf at document 12, position 5$"):
        build_cache(_cfg(tiny_qwen, p, tmp_path / "c.h5"), models={"base": lm})
    # deterministic bad input after earlier commits: no resumable-looking partial is left
    assert not partial_path(tmp_path / "c.h5").exists() and not (tmp_path / "c.h5").exists()


def test_diff_rerun_removes_stale_outputs(tmp_path):
    from saediff.diff.differ import DiffResult

    out = tmp_path / "diff"
    row = {"rank": 1, "latent": 0, "mean_shift": 1.0, "ci_low": 0.5, "ci_high": 1.5,
           "direction": "up", "freq_shift": 0.1, "norm_shift": 0.1}
    from saediff.diff.differ import TABLE_FIELDS
    row = {**{k: 0 for k in TABLE_FIELDS}, **row}
    out.mkdir()
    (out / "report.html").write_text("old report")
    (out / "trajectory.json").write_text("{}")
    DiffResult(table=[row]).to_dir(out, html=False)
    assert not (out / "report.html").exists() and not (out / "trajectory.json").exists()
    assert json.loads((out / "ranking.json").read_text())[0]["latent"] == 0


def test_unwritable_output_dirs_refused_before_models_run(tmp_path):
    from saediff.io import check_writable_dir
    from saediff.steer.sweep import SweepConfig, run_sweep

    blocker = tmp_path / "file"
    blocker.write_text("x")
    cfg = SweepConfig(model=str(tmp_path / "no-model"), prompts=str(tmp_path / "no.txt"),
                      sae="s", latent=[0], out=str(blocker / "sub"))
    with pytest.raises(SaediffError, match="not a directory|not writable"):
        run_sweep(cfg)  # the model path does not exist: it fails on --out first
    with pytest.raises(SaediffError, match="exists and is not a directory"):
        check_writable_dir(blocker)
