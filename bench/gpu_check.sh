#!/usr/bin/env bash
# The GPU paths in one go, on a machine with an NVIDIA GPU; prints JSON lines, ~8 minutes.
#
#   bash bench/gpu_check.sh                 # creates .venv-gpu (CUDA torch, faiss-gpu) first
#   PYTHON=/path/to/python bash bench/gpu_check.sh --skip-install   # an environment you have
#
# 1. install: a virtualenv with PyPI's CUDA build of torch and faiss-gpu instead of faiss-cpu;
# 2. resnet50 BoT and MGN at 256x128, batch 64: images/s of a plain training loop in fp32 and
#    with bf16 autocast + channels-last (bench/train_throughput.py --no-ray);
# 3. a 1-GPU Ray Train run of BoT with bf16 + channels-last against the plain loop (ratio);
# 4. faiss-gpu against faiss-cpu: exact search of 10k queries in 1M x 256 vectors, QPS and
#    top-10 agreement.
# Each step prints its JSON lines (or {"check": ..., "ok": false, "error": ...}) and the
# script goes on to the next one; the last line sums up which steps passed.
set -uo pipefail
cd "$(dirname "$0")/.."
SKIP_INSTALL=0
[[ "${1:-}" == "--skip-install" ]] && SKIP_INSTALL=1
export NO_ALBUMENTATIONS_UPDATE=1 PYTHONUNBUFFERED=1
declare -A STATUS

fail() {  # fail STEP MESSAGE
  printf '{"check": "%s", "ok": false, "error": %s}\n' "$1" \
    "$(printf '%s' "$2" | tail -c 1500 | python3 -c 'import json,sys; print(json.dumps(sys.stdin.read()))')"
  STATUS[$1]=false
}

run_step() {  # run_step STEP TIMEOUT_S COMMAND...: JSON lines to stdout, the rest to a log
  local step=$1 limit=$2; shift 2
  local log; log=$(mktemp)
  if timeout "$limit" "$@" >"$log" 2>&1; then
    grep -E '^\{' "$log" || true
    STATUS[$step]=true
  else
    fail "$step" "$(grep -v '^{' "$log")"
    grep -E '^\{' "$log" || true
  fi
  rm -f "$log"
}

if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
  echo '{"check": "gpu", "ok": false, "error": "no NVIDIA GPU (nvidia-smi -L failed)"}'
  exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -1 |
  python3 -c 'import json,sys; n,m,d=[x.strip() for x in sys.stdin.read().split(",")]; print(json.dumps({"check": "gpu", "ok": True, "name": n, "memory": m, "driver": d}))'

PY=${PYTHON:-.venv-gpu/bin/python}
if [[ $SKIP_INSTALL == 0 ]]; then
  start=$(date +%s)
  log=$(mktemp)
  if { python3 -m venv .venv-gpu && .venv-gpu/bin/pip install -q -U pip &&
       .venv-gpu/bin/pip install -q -e ".[dev]" &&   # no CPU constraints: CUDA torch
       .venv-gpu/bin/pip uninstall -q -y faiss-cpu &&
       .venv-gpu/bin/pip install -q "faiss-gpu>=1.8" &&
       .venv-gpu/bin/python reid_platform/torchvision_hook.py; } >"$log" 2>&1; then
    echo "{\"check\": \"install\", \"ok\": true, \"seconds\": $(( $(date +%s) - start ))}"
    STATUS[install]=true
  else
    fail install "$(cat "$log")"
  fi
  rm -f "$log"
fi
if env_line=$("$PY" -c 'import json, torch, faiss; print(json.dumps({"check": "environment", "ok": torch.cuda.is_available(), "torch": torch.__version__, "cuda": torch.version.cuda, "bf16": torch.cuda.is_available() and torch.cuda.is_bf16_supported(), "faiss_gpus": faiss.get_num_gpus()}))' 2>&1); then
  echo "$env_line" | tail -1
  [[ "$env_line" == *'"ok": true'* ]] && STATUS[environment]=true || STATUS[environment]=false
else
  fail environment "torch/faiss do not import in $PY: $env_line"
fi

LOADERS=$(( $(nproc) > 8 ? 8 : $(nproc) ))
COMMON=(--backbone resnet50 --height 256 --width 128 --p 16 --k 4 --batches 30
        --loader-workers "$LOADERS")
FAISS_N=1000000
if [[ "${GPU_CHECK_SMOKE:-0}" == 1 ]]; then  # the script's own logic, tiny sizes, any machine
  COMMON=(--smoke-test)
  FAISS_N=20000
fi
export FAISS_N
run_step throughput 300 "$PY" bench/train_throughput.py "${COMMON[@]}" \
  --families bot mgn --paths off bf16_cl --no-ray --no-loader
run_step ray_train 240 "$PY" bench/train_throughput.py "${COMMON[@]}" \
  --families bot --paths bf16_cl --workers 1

run_step faiss_gpu 180 "$PY" - <<'PYEOF'
import json, time
import numpy as np, faiss
rng = np.random.default_rng(0)
import os
n, d, nq, k = int(os.environ["FAISS_N"]), 256, 10_000, 10
xb = rng.standard_normal((n, d), dtype=np.float32); faiss.normalize_L2(xb)
xq = rng.standard_normal((nq, d), dtype=np.float32); faiss.normalize_L2(xq)
cpu = faiss.IndexFlatIP(d); cpu.add(xb)
start = time.perf_counter(); _, cpu_ids = cpu.search(xq[:1000], k); cpu_s = time.perf_counter() - start
if faiss.get_num_gpus() < 1:
    raise SystemExit("faiss sees no GPU: is faiss-gpu installed (not faiss-cpu)?")
gpu = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, cpu)
gpu.search(xq[:100], k)  # warm-up
start = time.perf_counter(); _, gpu_ids = gpu.search(xq, k); gpu_s = time.perf_counter() - start
agree = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(cpu_ids, gpu_ids[:1000])]))
print(json.dumps({"bench": "faiss_gpu", "n": n, "dim": d, "k": k,
                  "cpu_qps": round(1000 / cpu_s, 1), "gpu_qps": round(nq / gpu_s, 1),
                  "gpu_vs_cpu": round((nq / gpu_s) / (1000 / cpu_s), 1),
                  "top10_agreement": round(agree, 4)}))
PYEOF

python3 - "$(declare -p STATUS)" <<'PYEOF'
import json, re, sys
status = dict(re.findall(r'\[(\w+)\]="?(\w+)', sys.argv[1]))
print(json.dumps({"check": "summary", "ok": all(v == "true" for v in status.values()),
                  "steps": {k: v == "true" for k, v in status.items()}}))
PYEOF
