"""Every script in examples/ runs and prints what it promises."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str) -> str:
    res = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


def test_cache_and_read_then_steer_generation(tmp_path):
    out = run("examples/cache_and_read.py", "--out", str(tmp_path), "--max-tokens", "6000")
    assert re.search(r"rows=6000 d_model=96 layer=0 sources=\['base', 'finetuned'\]", out), out
    assert "batch shape=(256, 96) dtype=torch.float32" in out
    shift = float(re.search(r"mean \|finetuned - base\| = ([0-9.]+)", out).group(1))
    assert shift > 0  # the two models differ on the same tokens
    sae = tmp_path / "sae"
    run("-m", "saediff", "train", "--config", "configs/toy_topk.yaml", "--cache", str(tmp_path / "organism.h5"),
        "--out", str(sae), "--total-tokens", "20000", "--batch-size", "512", "--d-sae", "128", "--k", "4")
    out = run("examples/steer_generation.py", "--sae", str(sae), "--latent", "0", "--n", "2")
    lines = [ln for ln in out.splitlines() if "misaligned" in ln]
    assert len(lines) == 4 and all(re.search(r"misaligned [0-2]/2", ln) for ln in lines), out


def test_hard_case_multi_block_steering(tmp_path):
    import json

    run("examples/hard_case.py", "--out", str(tmp_path), "--tokens", "3000", "--samples", "2",
        "--coefs", "1")
    s = json.loads((tmp_path / "hard_case.json").read_text())
    assert len(s["shift_norms"]) == 3 and all(n > 0 for n in s["shift_norms"])
    assert [r["directions"] for r in s["results"]] == [0, 1, 1, 1, 3, 3, 0, 3, 3]
    by = {(r["model"], r["edit"]): r for r in s["results"]}
    ft, base = by[("fine-tuned", "none")], by[("base", "none")]
    em = "misaligned_given_coherent"
    assert ft["n"] == base["n"] == 70 and ft[em] > base[em]  # the fine-tune is misaligned
    # subtracting the fine-tune's own shift at every block lowers its EM
    assert by[("fine-tuned", "sub 1·δ0 + sub 1·δ1 + sub 1·δ2")][em] < ft[em]


def test_every_example_imports(monkeypatch):
    """Each example's imports resolve against the library as it is now (the real-model ones are
    not run here: they need SmolLM2 and minutes to hours), so a renamed or removed library
    name fails here instead of in a user's hands."""
    import importlib.util

    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    scripts = sorted((ROOT / "examples").glob("*.py"))
    assert {"real_organism.py", "real_organism_scale.py"} <= {p.name for p in scripts}
    for path in scripts:
        spec = importlib.util.spec_from_file_location(f"example_{path.stem}", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)  # top level only: every script guards its main()
        if '__name__ == "__main__"' in path.read_text():  # a script, not a support module
            assert callable(getattr(mod, "main", None)), f"{path.name} has no main()"
