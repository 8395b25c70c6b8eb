"""benchmarks/gpu_check.sh: valid bash, and its --dry-run runs every step on CPU at tiny size."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.sh"


def test_gpu_check_is_valid_bash_and_refuses_bad_flags():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    r = subprocess.run(["bash", str(SCRIPT), "--fast"], capture_output=True, text=True)
    assert r.returncode == 2 and "usage" in r.stderr


@pytest.mark.slow
def test_gpu_check_dry_run_runs_every_step(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_OUT": str(tmp_path)}
    r = subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True,
                       env=env, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["dry_run"] is True and s["gpu"] == "CPU dry run"
    want = ["cache.ratio_cache_layer1_vs_bare",
            "cpu TopK d_sae 256 batch 64 float32.vs_ceiling",
            "cpu TopK d_sae 256 batch 64 float32.vs_adam_floor",
            "cpu TopK d_sae 256 batch 64 bf16-autocast.vs_saelens",
            "steer.clamp_topk_vs_limit"]
    for key in want:
        vals = s[key] if isinstance(s[key], list) else [s[key]]
        assert all(math.isfinite(v) and v > 0 for v in vals), (key, s[key])
    train = json.loads((tmp_path / "train.json").read_text())
    r = train["cpu"]["topk"][0]
    # the floor is the kept-output ceiling plus an Adam update: never faster than it (+ noise)
    assert r["floor_vs_kept_ceiling"] < 1.2 and r["adam_floor_tok_s"] > 0
    phases = r["breakdown_ms"]
    assert {"encode", "topk", "decode", "backward", "optimizer"} <= set(phases)
    assert phases["encode"] > 0 and phases["step"] >= phases["encode"]
    assert (tmp_path / "summary.md").read_text().startswith("# gpu_check on CPU dry run")
