#!/usr/bin/env bash
# The memory planner's GPU check (jobs/gpu_check.py) on a lent GPU machine, in two steps:
#
#   bash jobs/gpu_check.sh fetch    # here, once, in the repo root: download the wheels the GPU image
#                                   # lacks (diffusers 0.42.1, peft 0.21.2; py3-none-any) into .whl/
#                                   # (ignored by git; it travels with `carry: [".whl"]`)
#   bash jobs/gpu_check.sh run      # there: install .whl/ into /tmp/site, run the check under a hard
#                                   # time limit (GPU_CHECK_TIMEOUT, default 240 s), JSON + log to $OUT
#
# Extra arguments after `run` go to gpu_check.py (e.g. --micro-batch 4 --steps 3).
# The device tool's command:  bash jobs/gpu_check.sh run      with carry [".whl"], timeout_s 300.
set -uo pipefail
cd "$(dirname "$0")/.."

case "${1:-run}" in
  fetch)
    "${PYTHON:-python3}" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      -d .whl diffusers==0.42.1 peft==0.21.2
    ls -l .whl
    ;;
  run)
    out_dir="${OUT:-/tmp/gpu_check_out}"
    mkdir -p "$out_dir"
    ls .whl/*.whl >/dev/null 2>&1 || { echo "no wheels in .whl/: run 'bash jobs/gpu_check.sh fetch' here first" >&2; exit 3; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      || { echo "wheel install failed" >&2; exit 3; }
    export PYTHONPATH="$PWD/platform:$PWD:/tmp/site" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
    nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv > "$out_dir/nvidia_smi.csv" 2>&1 || true
    timeout -k 10 "${GPU_CHECK_TIMEOUT:-240}" python3 jobs/gpu_check.py --out "$out_dir/gpu_check.json" "${@:2}" 2>&1 \
      | tee "$out_dir/gpu_check.log"
    rc=${PIPESTATUS[0]}
    [ "$rc" = 124 ] && echo "gpu_check: hit the ${GPU_CHECK_TIMEOUT:-240}s limit; partial results in $out_dir/gpu_check.json"
    exit "$rc"
    ;;
  *)
    echo "usage: bash jobs/gpu_check.sh fetch|run [gpu_check.py args]" >&2
    exit 2
    ;;
esac
