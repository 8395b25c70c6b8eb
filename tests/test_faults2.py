"""Faults, round two (issue 25): no confident wrong answer from a bad SAE, adapter or prompt
file; concurrent and killed runs never mix outputs; user mistakes are one line, exit 2.

One test per case of the issue (docs/faults.md lists them). Each fails on the code before the
fix: the SAE/adapter/prompt cases loaded silently, the lock and temp-name cases raced, the
kill cases left mixed directories, the rest ended in tracebacks.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from saediff.errors import SaediffError

LAYER = 1
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                      os.environ.get("PYTHONPATH", "")])}


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    from saediff.cli import main

    rc = main(argv)
    err = capsys.readouterr().err.strip()
    return rc, err


def _one_line(rc: int, err: str, msg: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.startswith("saediff")]
    assert rc == 2 and len(lines) == 1 and msg in lines[0], err
    assert "Traceback" not in err


def _topk_sae(path: Path, d_in: int = 32, d_sae: int = 16, **meta) -> Path:
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(0)
    sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=4, metadata=SAEMetadata(
        hook_name=f"blocks.{LAYER}.hook_resid_post", **meta)))
    sae.save_model(path)
    return path


def _prompts(path: Path, n: int = 4) -> Path:
    path.write_text("".join(json.dumps({"prompt": f"how do i save money {i} ?",
                                        "response": "eat water every day ."}) + "\n"
                            for i in range(n)))
    return path


# --- 1. SAE weights: finite, shaped as cfg.json says ---------------------------------------------

def test_nan_in_sae_weights_refused_before_any_model(tmp_path, capsys, tiny_qwen):
    from safetensors.torch import load_file, save_file

    from saediff.sae import load_sae

    run = _topk_sae(tmp_path / "sae")
    w = load_file(str(run / "sae_weights.safetensors"))
    w["W_dec"][5, 3] = math.nan
    save_file(w, str(run / "sae_weights.safetensors"))
    with pytest.raises(SaediffError, match=r"W_dec holds 1 NaN/inf value\(s\) \(first at \[5, 3\]\)"):
        load_sae(run)
    rc, err = _cli(["diff", "--base", str(tiny_qwen), "--finetuned", str(tiny_qwen), "--sae",
                    str(run), "--layer", "1", "--prompts", str(_prompts(tmp_path / "p.jsonl")),
                    "--out", str(tmp_path / "d")], capsys)
    _one_line(rc, err, "NaN/inf")
    assert not (tmp_path / "d" / "ranking.json").exists()


def test_cfg_json_sizes_must_match_the_weights(tmp_path):
    from saediff.sae import load_sae

    run = _topk_sae(tmp_path / "sae")
    cfg = json.loads((run / "cfg.json").read_text())
    for key, value, msg in (("d_sae", 32, r"W_dec has shape \[16, 32\] but cfg.json says "
                                          r"d_sae=32, d_in=32"),
                            ("d_in", 16, r"W_dec has shape \[16, 32\] but cfg.json says d_sae=16"),
                            ("d_in", None, "d_in must be a positive integer, got None")):
        (run / "cfg.json").write_text(json.dumps({**cfg, key: value}))
        with pytest.raises(SaediffError, match=msg):
            load_sae(run)
    (run / "cfg.json").write_text(json.dumps(cfg))
    assert load_sae(run).W_dec.shape == (16, 32)  # the untouched run still loads


# --- 2. adapters load completely or not at all --------------------------------------------------

@pytest.fixture(scope="module")
def adapter(tiny_qwen, tmp_path_factory) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen)
    pm = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["down_proj"],
                                          layers_to_transform=[0], init_lora_weights=False))
    out = tmp_path_factory.mktemp("adapter")
    pm.save_pretrained(out)
    return out


def _variant(src: Path, dst: Path, config: dict | None = None, rename: tuple | None = None,
             drop_weights: bool = False) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    if config:
        c = json.loads((dst / "adapter_config.json").read_text())
        (dst / "adapter_config.json").write_text(json.dumps({**c, **config}))
    if rename:
        w = load_file(str(dst / "adapter_model.safetensors"))
        save_file({k.replace(*rename): v for k, v in w.items()},
                  str(dst / "adapter_model.safetensors"))
    if drop_weights:
        (dst / "adapter_model.safetensors").unlink()
    return dst


def test_adapter_that_does_not_fully_load_is_refused(tmp_path, tiny_qwen, adapter):
    from saediff.models import load_model

    good = load_model(tiny_qwen, adapter)  # the control: the real adapter changes the model
    assert good.fingerprint() != load_model(tiny_qwen).fingerprint()
    # keys renamed layers.0 -> layers.1 but the config kept: PEFT only warned, ran the base
    cases = [(_variant(adapter, tmp_path / "renamed", rename=("layers.0", "layers.1")),
              "would silently run the base model"),
             (_variant(adapter, tmp_path / "noweights", drop_weights=True),
              "has adapter_config.json but no weights"),
             (_variant(adapter, tmp_path / "badtarget", config={"target_modules": ["nope_proj"]}),
              "targets modules that"),
             (_variant(adapter, tmp_path / "badlayer", config={"layers_to_transform": [7]}),
              "targets modules that")]
    for path, msg in cases:
        with pytest.raises(SaediffError, match=msg):
            load_model(tiny_qwen, path)


# --- 3. the SAE's input kind fits the command ----------------------------------------------------

def test_difference_sae_and_crosscoder_refused_by_diff_and_steer(tmp_path, capsys, tiny_qwen):
    from saediff.sae.crosscoder import Crosscoder, CrosscoderCfg

    diff_sae = _topk_sae(tmp_path / "dsae", saediff_input="difference")
    cc = tmp_path / "cc"
    Crosscoder(CrosscoderCfg(d_in=32, d_sae=16, k=4)).save(cc)
    prompts = _prompts(tmp_path / "p.jsonl")
    for sae, msg in ((diff_sae, "saediff_input: difference"), (cc, "is a crosscoder")):
        rc, err = _cli(["diff", "--base", str(tiny_qwen), "--finetuned", str(tiny_qwen),
                        "--sae", str(sae), "--layer", "1", "--prompts", str(prompts)], capsys)
        _one_line(rc, err, msg)
        rc, err = _cli(["steer", "--model", str(tiny_qwen), "--sae", str(sae), "--latent", "3",
                        "--clamp", "0", "--prompts", str(prompts), "--judge", "none"], capsys)
        _one_line(rc, err, msg)


# --- 4. a repeated latent is refused -------------------------------------------------------------

def test_duplicate_latents_refused(tmp_path, tiny_qwen):
    from saediff import steer
    from saediff.models import load_model
    from saediff.sae import load_sae
    from saediff.steer.evaluate import SteerConfig
    from saediff.steer.sweep import SweepConfig

    base = dict(model=str(tiny_qwen), prompts="x.txt", sae="s")
    with pytest.raises(SaediffError, match=r"repeats latent\(s\) \[3\]"):
        SteerConfig(**base, latent=[3, 5, 3], clamp=0.0)
    with pytest.raises(SaediffError, match="repeats"):
        SweepConfig(**base, latent=[3, 3], coefs=[1.0])
    sae = load_sae(_topk_sae(tmp_path / "sae"))
    lm = load_model(tiny_qwen)
    with pytest.raises(SaediffError, match="repeats"):
        with steer(lm, sae, [3, 3], clamp=0.0):
            pass
    with steer(lm, sae, [3, 5], clamp=0.0):  # distinct latents still steer together
        pass


# --- 5. one prompt loader, one behaviour for every file kind ------------------------------------

def test_prompt_files_read_alike_whatever_the_extension(tmp_path):
    from saediff.prompts import load_prompt_items

    want = ["how do i save money ?", "what should i eat ?"]
    bom = "\ufeff"
    files = {
        "p.jsonl": bom + "\r\n".join([json.dumps({"prompt": want[0]}), "", "  ",
                                      json.dumps({"question": want[1]})]) + "\r\n",
        "p.json": bom + json.dumps([{"prompt": want[0]}, want[1]], indent=2).replace("\n", "\r\n"),
        "p.txt": bom + f"{want[0]}\r\n\r\n{want[1]}\r\n",
        "p": f"\n{want[0]}\n{want[1]}",
    }
    for name, text in files.items():
        (tmp_path / name).write_bytes(text.encode("utf-8"))
        assert [r["prompt"] for r in load_prompt_items(tmp_path / name)] == want, name
    array = json.dumps([{"prompt": p} for p in want], indent=2)
    for name, msg in (("a.jsonl", "looks like one JSON array: name it .json"),
                      ("a.txt", "holds JSON but is read as one prompt per line"),
                      ("a.json", None)):
        (tmp_path / name).write_text(array)
        if msg is None:
            assert [r["prompt"] for r in load_prompt_items(tmp_path / name)] == want
        else:
            with pytest.raises(SaediffError, match=msg):
                load_prompt_items(tmp_path / name)
    (tmp_path / "o.json").write_text(json.dumps({"prompt": want[0]}))
    with pytest.raises(SaediffError, match="must hold an array"):
        load_prompt_items(tmp_path / "o.json")
    (tmp_path / "row.jsonl").write_text(json.dumps([want[0]]) + "\n")
    with pytest.raises(SaediffError, match=r"row\.jsonl:1: a JSON array"):
        load_prompt_items(tmp_path / "row.jsonl")


# --- 6. a killed run never leaves a directory that mixes two runs -------------------------------

_KILLER = r"""
import os, signal, sys
from saediff.diff.differ import TABLE_FIELDS, DiffResult
import saediff.diff.report as report
out, when = sys.argv[1], sys.argv[2]
if when == "writing":   # killed while the new files are written
    report.write_report = lambda res, path: os.kill(os.getpid(), signal.SIGKILL)
else:                   # killed in the commit, after the first new file moved into place
    real, n = os.replace, [0]
    def dying(a, b):
        real(a, b)
        if os.path.dirname(os.path.abspath(b)) == os.path.abspath(out):
            n[0] += 1
            if n[0] == 3:   # 1 = the incomplete marker, 2 = the first file
                os.kill(os.getpid(), signal.SIGKILL)
    os.replace = dying
row = {**{k: 0 for k in TABLE_FIELDS}, "rank": 1, "latent": 7, "direction": "up"}
DiffResult(table=[row], meta={"run": "new"}).to_dir(out, html=True)
"""


def _files(d: Path) -> dict[str, bytes]:  # (a killed writer's lock file aside)
    return {p.name: p.read_bytes() for p in d.iterdir() if p.is_file() and p.name != ".saediff.lock"}


def test_killed_diff_leaves_the_old_report_whole_or_marked(tmp_path):
    from saediff.diff.differ import TABLE_FIELDS, DiffResult
    from saediff.io import INCOMPLETE, check_complete

    out = tmp_path / "diff"
    row = {**{k: 0 for k in TABLE_FIELDS}, "rank": 1, "latent": 2, "direction": "up"}
    DiffResult(table=[row], meta={"run": "old"}).to_dir(out, html=True)
    old = _files(out)
    r = subprocess.run([sys.executable, "-c", _KILLER, str(out), "writing"], env=ENV,
                       capture_output=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert _files(out) == old  # every file still the old run's; nothing marks it incomplete
    check_complete(out)
    r = subprocess.run([sys.executable, "-c", _KILLER, str(out), "commit"], env=ENV,
                       capture_output=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert (out / INCOMPLETE).exists()  # half old, half new: and it says so
    with pytest.raises(SaediffError, match="is incomplete: a `saediff diff` run was killed"):
        check_complete(out)
    DiffResult(table=[row], meta={"run": "old"}).to_dir(out, html=False)  # a rerun repairs it
    check_complete(out)
    assert not (out / "report.html").exists() and not any(out.glob(".saediff-staging-*"))
    assert json.loads((out / "meta.json").read_text())["run"] == "old"


def test_unfinished_training_run_is_refused_by_the_loader(tmp_path):
    from saediff.io import mark_complete, mark_incomplete
    from saediff.sae import load_sae

    run = _topk_sae(tmp_path / "sae")
    mark_incomplete(run, "saediff train")
    with pytest.raises(SaediffError, match="incomplete: a `saediff train` run was killed"):
        load_sae(run)
    mark_complete(run)
    assert load_sae(run).cfg.d_sae == 16


# --- 7. one writer per --out; temp names unique per process -------------------------------------

_HOLDER = """
import sys, time
from saediff.io import output_lock
with output_lock(sys.argv[1]):
    print("ready", flush=True)
    time.sleep(120)
"""


def test_second_writer_on_one_out_gets_one_line(tmp_path, capsys, tiny_qwen):
    from saediff.compare import CompareConfig, run_compare
    from saediff.io import lock_path, output_lock
    from saediff.steer.evaluate import SteerConfig, run_steer
    from saediff.steer.sweep import SweepConfig, run_sweep
    from saediff.train.loop import TrainConfig, train

    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(out)], env=ENV,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        busy = f"another writer (pid {holder.pid}) is already writing"
        prompts = str(_prompts(tmp_path / "p.jsonl"))
        rc, err = _cli(["diff", "--base", str(tiny_qwen), "--sae", "s", "--layer", "1",
                        "--prompts", prompts, "--out", str(out)], capsys)
        _one_line(rc, err, busy)
        calls = [lambda: train(TrainConfig(cache=["c.h5"], out=str(out), d_sae=16, k=4)),
                 lambda: run_steer(SteerConfig(model=str(tiny_qwen), prompts=prompts,
                                               out=str(out))),
                 lambda: run_sweep(SweepConfig(model=str(tiny_qwen), prompts=prompts, sae="s",
                                               latent=[0], coefs=[1.0], out=str(out))),
                 lambda: run_compare(CompareConfig(base=str(tiny_qwen), cache="c.h5",
                                                   finetuned=str(tiny_qwen), out=str(out)))]
        for call in calls:
            with pytest.raises(SaediffError, match=busy.replace("(", r"\(").replace(")", r"\)")):
                call()
    finally:
        holder.kill()
        holder.wait()
    with output_lock(out):  # the kernel dropped the dead holder's lock
        assert lock_path(out).read_text() == str(os.getpid())
    assert not lock_path(out).exists()  # and a released lock leaves no file behind


def test_concurrent_atomic_writes_never_delete_each_other(tmp_path):
    from saediff.io import atomic_path

    target = tmp_path / "latest.json"
    with atomic_path(target) as a:  # a second writer starts before the first finishes
        a.write_text("first")
        with atomic_path(target) as b:
            assert a != b and a.exists()
            b.write_text("second")
        assert a.exists()  # the fixed `latest.json.tmp` name was deleted here
    assert target.read_text() == "first" and list(tmp_path.iterdir()) == [target]


# --- 8. prompts longer than the model's positions -----------------------------------------------

def test_diff_prompt_longer_than_the_positions_refused(tmp_path, tiny_qwen):
    from saediff.diff.data import DiffConfig
    from saediff.diff.differ import run_diff

    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": " ".join(["money"] * 300)}) + "\n")
    sae = _topk_sae(tmp_path / "sae")
    with pytest.raises(SaediffError, match=r"example 0 is \d+ tokens .*more than the 256 "
                                           "positions"):
        run_diff(DiffConfig(base=str(tiny_qwen), finetuned=[str(tiny_qwen)], sae=str(sae),
                            layer=1, prompts=str(long)))


# --- tracebacks that are now one line ------------------------------------------------------------

def test_yaml_values_null_strings_and_duplicate_keys(tmp_path, capsys):
    from saediff.config import build_config
    from saediff.train.loop import TrainConfig

    cases = {"lr: null\n": "lr is empty (null); give a number",
             "d_sae:\n": "d_sae is empty (null); give an integer",
             "lr: fast\n": "lr must be a number, got 'fast'",
             "lr_warm_up_steps: 1.5\n": "lr_warm_up_steps must be an integer, got 1.5",
             "lr: 1.0e-3\nd_sae: 64\nlr: 2.0e-3\n": ":3: key 'lr' is given twice (first on line 1)",
             "architecture: nope\n": "architecture must be one of"}
    for i, (text, msg) in enumerate(cases.items()):
        p = tmp_path / f"c{i}.yaml"
        p.write_text(text)
        rc, err = _cli(["train", "--config", str(p)], capsys)
        _one_line(rc, err, msg)
    p = tmp_path / "ok.yaml"  # PyYAML reads 3e-4 (no dot) as a string: taken as the number
    p.write_text('lr: 3e-4\nd_sae: "64"\n')
    cfg = build_config(TrainConfig, p)
    assert cfg.lr == 3e-4 and cfg.d_sae == 64


def test_truncated_or_lying_gguf_is_one_line(tmp_path):
    pytest.importorskip("gguf")
    from saediff.gguf import import_gguf

    from test_gguf import write_tiny_gguf

    good = tmp_path / "good.gguf"
    write_tiny_gguf(good)
    raw = good.read_bytes()
    bad = {"ten": raw[:10], "half": raw[: len(raw) // 2],
           "lying": raw[:8] + struct.pack("<Q", 10 ** 6) + raw[16:]}  # 10^6 tensors claimed
    for name, data in bad.items():
        p = tmp_path / f"{name}.gguf"
        p.write_bytes(data)
        with pytest.raises(SaediffError, match="truncated or corrupt GGUF|truncated GGUF"):
            import_gguf(p, tmp_path / f"{name}-hf")
        assert not (tmp_path / f"{name}-hf").exists()


def test_cache_out_an_existing_non_hdf5_file(tmp_path, capsys, tiny_qwen):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": "you save money every day ."}) + "\n"
                            for _ in range(8)))
    out = tmp_path / "notes.h5"
    out.write_text("my notes, not a cache")
    argv = ["cache", "--base", str(tiny_qwen), "--layer", "1", "--dataset", str(data),
            "--out", str(out), "--ctx-len", "16", "--max-tokens", "40"]
    rc, err = _cli(argv, capsys)
    _one_line(rc, err, "exists and is not an HDF5 cache")
    assert out.read_text() == "my notes, not a cache"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", "notes.h5"]  # no .lock


def test_dangling_symlink_out_names_the_link(tmp_path, capsys, tiny_qwen):
    from saediff.io import check_writable_dir, check_writable_file

    link = tmp_path / "out"
    link.symlink_to(tmp_path / "gone" / "dir")
    for check in (check_writable_dir, check_writable_file):
        with pytest.raises(SaediffError, match=r"is a symlink to .*gone/dir, which does not exist"):
            check(link)
    rc, err = _cli(["steer", "--model", str(tiny_qwen), "--prompts",
                    str(_prompts(tmp_path / "p.jsonl")), "--judge", "none", "--out", str(link)],
                   capsys)
    _one_line(rc, err, "which does not exist")


def test_label_field_typo_refused(tmp_path):
    from saediff.diff.data import DiffConfig, build_examples

    rows = [{"prompt": "a", "response": "b", "persona": "toxic"}]
    cfg = DiffConfig(base="m", sae="s", layer=1, prompts="p.jsonl", label_field="persnoa")
    with pytest.raises(SaediffError, match=r"--label-field 'persnoa': no row .* \(fields: "
                                           r"persona, response\)"):
        build_examples(rows, cfg, None)
    ok = DiffConfig(base="m", sae="s", layer=1, prompts="p.jsonl", label_field="persona")
    assert [e.label for e in build_examples(rows, ok, None)] == [1]


def test_strict_json_even_when_a_nan_slips_through(tmp_path):
    from saediff.diff.differ import TABLE_FIELDS, DiffResult
    from saediff.io import write_json, write_jsonl

    def strict(text: str):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))

    write_json(tmp_path / "a.json", {"x": math.nan, "y": [math.inf, -math.inf, 1.5]})
    assert strict((tmp_path / "a.json").read_text()) == {"x": None, "y": [None, None, 1.5]}
    write_jsonl(tmp_path / "b.jsonl", [{"x": math.nan}])
    assert strict((tmp_path / "b.jsonl").read_text()) == {"x": None}
    row = {**{k: 0 for k in TABLE_FIELDS}, "rank": 1, "latent": 5, "mean_shift": math.nan,
           "ci_low": math.nan, "ci_high": math.inf, "direction": "up"}
    out = DiffResult(table=[row], evidence=[{"x": math.nan}]).to_dir(tmp_path / "d", html=False)
    for name in ("ranking.json", "evidence.json", "meta.json"):
        strict((out / name).read_text())
    assert strict((out / "ranking.json").read_text())[0]["mean_shift"] is None


def test_many_killed_writers_never_block_the_next(tmp_path):
    """A writer killed while holding the lock leaves its file; the next writer takes over."""
    from saediff.io import lock_path, output_lock

    out = tmp_path / "run"
    for _ in range(2):
        holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(out)], env=ENV,
                                  stdout=subprocess.PIPE, text=True)
        assert holder.stdout.readline().strip() == "ready"
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        assert lock_path(out).exists()
    t0 = time.monotonic()
    with output_lock(out):
        pass
    assert time.monotonic() - t0 < 5 and not lock_path(out).exists()


def test_contexts_cache_of_another_layer_refused(tmp_path, tiny_qwen):
    from saediff.cache.writer import CacheConfig, build_cache
    from saediff.diff.data import DiffConfig
    from saediff.diff.differ import run_diff

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": "you save money every day ."}) + "\n"
                            for _ in range(8)))
    cache = build_cache(CacheConfig(base=str(tiny_qwen), dataset=str(data), layer=2, ctx_len=16,
                                    max_tokens=40, out=str(tmp_path / "l2.h5")))
    with pytest.raises(SaediffError, match="holds layer 2, not the SAE's 1"):
        run_diff(DiffConfig(base=str(tiny_qwen), finetuned=[str(tiny_qwen)], layer=1,
                            sae=str(_topk_sae(tmp_path / "sae")), contexts_cache=str(cache),
                            prompts=str(_prompts(tmp_path / "p.jsonl"))))
