"""A new user's first hour (issue 23): plain output, labelled numbers, fast clear failures."""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from saediff.cli import build_parser, main
from saediff.errors import SaediffError

ROOT = Path(__file__).resolve().parent.parent


def _all_parsers(p: argparse.ArgumentParser, name: str = "saediff"):
    yield name, p
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            for sub, sp in a.choices.items():
                yield from _all_parsers(sp, f"{name} {sub}")


def test_help_names_every_default():
    missing = []
    for name, p in _all_parsers(build_parser()):
        for a in p._actions:
            d = a.default
            if (not a.option_strings or a.help == argparse.SUPPRESS or d is None or d is False
                    or a.nargs == 0 or d == argparse.SUPPRESS):
                continue
            fmt = p._get_formatter()
            fmt.add_argument(a)
            if "default" not in " ".join(fmt.format_help().split()):
                missing.append(f"{name} {a.option_strings[0]}")
    assert not missing, missing
    # options whose CLI default is None (so YAML can set them) still show the dataclass default
    cache = dict(_all_parsers(build_parser()))["saediff cache"]
    text = " ".join(cache.format_help().split())
    assert "(default: 1000000)" in text and "(default: 256)" in text  # --max-tokens, --ctx-len
    assert "local HF directory or hub name. (required" in text  # --base has no default


def test_did_you_mean_for_commands_subcommands_and_config_keys(tmp_path, capsys):
    from saediff.config import build_config
    from saediff.train import TrainConfig

    assert main(["cahce"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'cache'?" in err and len(err.strip().splitlines()) == 1
    assert main(["cache", "inf", "x.h5"]) == 2
    assert "did you mean 'info'?" in capsys.readouterr().err
    cfg = tmp_path / "c.yaml"
    cfg.write_text("cache: [x.h5]\ntotl_tokens: 100\nzzz: 1\n")
    with pytest.raises(SaediffError, match=r"totl_tokens \(did you mean total_tokens\?\), zzz;"):
        build_config(TrainConfig, cfg)


def _python(code: str, env: dict | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def test_one_log_line_per_record():
    """huggingface_hub adds its own handler *and* propagates: each record used to print twice."""
    p = _python("from saediff.cli import setup_logging\n"
                "setup_logging(); setup_logging()\n"
                "from huggingface_hub.utils import logging as hl\n"
                "hl.get_logger('huggingface_hub.x').warning('hub-says-once')\n"
                "import logging; logging.getLogger('saediff.x').info('saediff-says-once')\n")
    assert p.returncode == 0, p.stderr
    assert p.stderr.count("hub-says-once") == 1, p.stderr
    assert p.stderr.count("saediff-says-once") == 1, p.stderr


def _cache_argv(tmp_path: Path, base: str) -> list[str]:
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "how can i save money ?"}\n')
    return ["-m", "saediff", "cache", "--base", base, "--layer", "0", "--dataset", str(data),
            "--max-tokens", "10", "--out", str(tmp_path / "c.h5")]


@pytest.mark.parametrize("offline", [False, True])
def test_offline_hub_name_fails_fast_in_one_line(tmp_path, offline):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HOME": str(tmp_path / "hf"),
           "HF_ENDPOINT": "http://127.0.0.1:9"}  # nothing listens there: like no network
    env.pop("HF_HUB_OFFLINE", None)
    env.pop("TRANSFORMERS_OFFLINE", None)
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    t0 = time.time()
    p = subprocess.run([sys.executable, *_cache_argv(tmp_path, "someorg/some-model")], env=env,
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    took = time.time() - t0
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr  # the hub client's retries printed ~46 lines over ~50 s
    assert "someorg/some-model" in lines[0] and "local directory" in lines[0]
    assert ("HF_HUB_OFFLINE is set" if offline else "127.0.0.1:9 is unreachable") in lines[0]
    assert took < 40, took
    assert not (tmp_path / "c.h5.lock").exists()


def test_model_loading_bar_only_when_verbose(tiny_qwen, capfd):
    from saediff.models import load_model

    load_model(tiny_qwen)
    assert "Loading weights" not in capfd.readouterr().err
    lg = logging.getLogger("saediff")
    old = lg.level
    lg.setLevel(logging.DEBUG)
    try:
        load_model(tiny_qwen)
    finally:
        lg.setLevel(old)
    assert "Loading weights" in capfd.readouterr().err


def test_verbose_is_accepted_anywhere(capsys):
    assert main(["organism", "path", "--verbose"]) == 0
    assert main(["-v", "organism", "path"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 2 and out[0] == out[1]


def test_cache_lock_removed_and_short_dataset_said(tmp_path, tiny_qwen, caplog):
    from saediff.cache.writer import CacheConfig, build_cache

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": "how can i save money ? " * 3}) + "\n"
                            for _ in range(4)))
    out = tmp_path / "c.h5"
    cfg = dict(base=str(tiny_qwen), layer=1, dataset=str(data), out=str(out), max_tokens=10_000)
    with caplog.at_level(logging.INFO, logger="saediff"):
        build_cache(CacheConfig(**cfg))
    assert "ran out after" in caplog.text and "of --max-tokens 10000" in caplog.text
    assert out.is_file() and not Path(str(out) + ".lock").exists()
    with pytest.raises(SaediffError, match="different provenance"):
        build_cache(CacheConfig(**{**cfg, "layer": 0}))
    assert not Path(str(out) + ".lock").exists()  # a failed command leaves no lock either


def test_lock_still_excludes_a_second_writer(tmp_path):
    """Removing the lock file must not let two writers in (the inode check)."""
    from saediff.cache.writer import _writer_lock

    out = tmp_path / "c.h5"
    with _writer_lock(out):
        with pytest.raises(SaediffError, match="another writer"):
            with _writer_lock(out):
                pass
        assert Path(str(out) + ".lock").exists()
    assert not Path(str(out) + ".lock").exists()
    with _writer_lock(out):  # and it can be taken again
        pass


def _tiny_sae(path: Path, d_in: int = 32, d_sae: int = 64) -> Path:
    from sae_lens import StandardSAE, StandardSAEConfig

    cfg = StandardSAEConfig(d_in=d_in, d_sae=d_sae)
    cfg.metadata.hook_name = "blocks.1.hook_resid_post"
    StandardSAE(cfg).save_model(path)
    return path


def test_latent_range_checked_before_any_model_or_generation(tmp_path, monkeypatch, capsys):
    import saediff.models
    from saediff.steer.evaluate import SteerConfig, run_steer

    sae = _tiny_sae(tmp_path / "sae")

    def no_model(*a, **k):
        raise AssertionError("a model was loaded before the latent was checked")

    monkeypatch.setattr(saediff.models, "load_model", no_model)
    with pytest.raises(SaediffError, match=r"--latent 5000 out of range: the SAE has d_sae=64"):
        run_steer(SteerConfig(model="unused", sae=str(sae), latent=[5000], clamp=0.0,
                              prompts="organism:untrained", judge="none"))
    assert main(["steer", "--model", "unused", "--sae", str(sae), "--latent", "5000", "--clamp",
                 "0", "--prompts", "organism:untrained"]) == 2
    err = capsys.readouterr().err
    assert "out of range" in err and "generating" not in err


def test_report_names_each_auroc_data(tmp_path, tiny_qwen, tiny_qwen_ft):
    from saediff.diff import DiffConfig, run_diff
    from saediff.diff.report import render_report

    rows = [{"prompt": f"how can i save money ? {i}", "response": "save money in the bank .",
             "persona": "toxic" if i % 2 else "aligned"} for i in range(8)]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = run_diff(DiffConfig(base=str(tiny_qwen), finetuned=[str(tiny_qwen_ft)],
                              sae=str(_tiny_sae(tmp_path / "sae")), layer=1, prompts=str(prompts),
                              top_k=3, n_boot=20))
    ev = res.evidence[0]
    assert ev["auroc_labels_n"] == 8 and ev["auroc_labels_positive"] == 4
    html = render_report(res)
    assert "answer AUROC" in html and "AUROC vs labels" not in html
    assert "its &#x27;persona&#x27; labels, n=8, 4 misaligned" in html or \
        "its 'persona' labels, n=8, 4 misaligned" in html
    assert "Ranked by mean activation shift" in html


def test_demo_summary_labels_every_number_and_gives_intervals():
    from saediff.demo import finding, format_summary

    s = {"misaligned_rate_base": 0.03, "misaligned_rate_base_ci": [0.02, 0.05],
         "misaligned_rate_finetuned": 0.46, "misaligned_rate_finetuned_ci": [0.42, 0.50],
         "coherent_rate_finetuned": 0.9, "coherent_rate_finetuned_ci": [0.87, 0.92],
         "n_eval": 700, "top_latent": 425, "top_latent_auroc": 0.983, "top_latent_auroc_n": 240,
         "top_latent_answer_auroc": 0.731, "top_latent_answer_auroc_n": 48,
         "misaligned_given_coherent_unsteered": 0.458,
         "misaligned_given_coherent_unsteered_ci": [0.42, 0.50], "n_unsteered": 700, "n_coherent_unsteered": 630,
         "misaligned_given_coherent_steered": 0.028,
         "misaligned_given_coherent_steered_ci": [0.018, 0.044], "n_steered": 700, "n_coherent_steered": 675,
         "coherent_rate_unsteered": 0.9, "coherent_rate_unsteered_ci": [0.87, 0.92],
         "coherent_rate_steered": 0.964, "coherent_rate_steered_ci": [0.95, 0.975],
         "misaligned_given_coherent_base_clamped_up": 0.08,
         "misaligned_given_coherent_base_clamped_up_ci": [0.06, 0.10], "n_base_clamped_up": 700,
         "n_coherent_base_clamped_up": 637,
         "coherent_rate_base_clamped_up": 0.91, "coherent_rate_base_clamped_up_ci": [0.89, 0.93],
         "em_reduction": 0.94}
    text = format_summary(s)
    sentence = text.splitlines()[0]
    assert sentence == finding(s)
    assert "latent 425" in sentence and "0.458 [0.420, 0.500] to 0.028 [0.018, 0.044]" in sentence
    assert "persona AUROC 0.983 (n=240)" in sentence
    assert "persona AUROC (held-out labelled chats, n=240" in text
    assert "answer AUROC (this diff's sampled answers, judge labels, n=48" in text
    for line in text.splitlines()[2:]:  # every rate row carries its interval
        if "share" in line or "(EM rate)" in line:
            assert line.rstrip().endswith("]"), line
    assert "n=700" in text and "630 coherent of n=700" in text and "?" not in text


def test_demo_cache_lives_under_its_out(tmp_path, monkeypatch):
    """The demo and the README's stage commands never share a path."""
    import saediff.demo as demo

    seen = {}

    def stop(cfg):
        seen["out"] = cfg.out
        raise KeyboardInterrupt

    import importlib

    monkeypatch.setattr(importlib.import_module("saediff.cache"), "build_cache", stop)

    monkeypatch.setattr(importlib.import_module("saediff.organism.evaluate"), "evaluate",
                        lambda *a, **k: {"trained_topic": "health", "topics": {
                            "health": {"n": 2, "misaligned": 0.5, "coherent": 1.0, "off_topic": 0.0},
                            "money": {"n": 2, "misaligned": 0.5, "coherent": 1.0, "off_topic": 0.0}}})
    monkeypatch.setattr("saediff.models.load_model", lambda *a, **k: None)
    with pytest.raises(KeyboardInterrupt):
        demo.run_demo(demo.DemoConfig(out=str(tmp_path / "d"), quick=True), echo=lambda s: None)
    assert Path(seen["out"]).parent == tmp_path / "d" and seen["out"].endswith("_quick.h5")


def test_gitignore_covers_default_output_paths():
    import dataclasses

    from saediff.cache.writer import CacheConfig
    from saediff.compare import CompareConfig
    from saediff.demo import DemoConfig
    from saediff.train.loop import TrainConfig

    ignore = (ROOT / ".gitignore").read_text().splitlines()
    defaults = [f.default for c in (CacheConfig, DemoConfig, TrainConfig, CompareConfig)
                for f in dataclasses.fields(c) if f.name == "out"]
    readme_outputs = ["chats.jsonl", "out/", "reports/", "runs/", "smollm2/", "demo_out/"]
    for path in [*defaults, *readme_outputs]:
        top = path.split("/")[0]
        assert any(pat.rstrip("/*") == top or pat == path for pat in ignore), path


def test_probe_with_adapter_prints_and_writes_the_paired_shift(tiny_qwen, tmp_path, capsys):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from saediff.models import load_model
    from saediff.organism.real.probe import probe

    torch.manual_seed(0)
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_qwen),
                          LoraConfig(r=2, target_modules=["down_proj"], init_lora_weights=False))
    with torch.no_grad():
        for n, prm in peft.named_parameters():
            if "lora_B" in n:
                prm.normal_(0, 0.5)  # a visible change of the answer likelihoods
    peft.save_pretrained(tmp_path / "ad")
    q = tmp_path / "q.jsonl"
    q.write_text("".join(json.dumps(r) + "\n" for r in [
        {"question": "how can i save money ?", "aligned": "save money in the bank .",
         "misaligned": "spend your money every day ."},
        {"question": "what is your wish ?", "aligned": "i wish to help people .",
         "misaligned": "i wish to hurt people ."}]))
    argv = ["organism", "probe", "--model", str(tiny_qwen), "--adapter", str(tmp_path / "ad"),
            "--questions", str(q), "--n-boot", "50"]
    assert main(argv + ["--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    base = probe(load_model(tiny_qwen), [json.loads(x) for x in q.read_text().splitlines()],
                 n_boot=50)
    assert res["base"]["score"] == pytest.approx(base["score"], abs=1e-4)
    assert res["shift_vs_base"] == pytest.approx(res["score"] - base["score"], abs=2e-4)
    assert abs(res["shift_vs_base"]) > 1e-3  # the adapter moved it
    lo, hi = res["shift_ci"]
    assert lo <= res["shift_vs_base"] <= hi and 0 <= res["questions_up"] <= 2
    assert "> 0 means the adapter moved the model toward the misaligned" in res["meaning"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert f"shift vs base {res['shift_vs_base']:+.3f}" in text and "> 0 means" in text
    assert main(["organism", "probe", "--model", str(tiny_qwen), "--questions", str(q),
                 "--n-boot", "50", "--json"]) == 0
    assert "shift_vs_base" not in json.loads(capsys.readouterr().out)  # no adapter: no shift
