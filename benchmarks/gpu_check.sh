#!/usr/bin/env bash
# The one-call GPU check (see benchmarks/gpu_check.py): install this checkout without touching the machine's
# torch, run the GPU tests, the ceilings, the kernel and end-to-end benchmarks with their baselines; write one JSON
# record and its markdown summary into $OUT (or the folder given as the first argument); print a short table last.
#   bash benchmarks/gpu_check.sh [OUT_DIR] [--quick] [--parts tests kernels decode ...] [--budget-s S]
#                                [--resume benchmarks/results/<record>.json]  (a second call: the parts not done yet)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results/local}"
if [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; then out="$1"; shift; fi
mkdir -p "$out"
# the whole pip output in the record folder: a failed install must say why, not end in "No module named qwen2rt"
if ! python3 -m pip install -q --no-deps --no-build-isolation -e . > "$out/pip.log" 2>&1 \
        || ! python3 -c "import qwen2rt" 2>> "$out/pip.log"; then
    echo "install failed: the end of $out/pip.log:"; tail -30 "$out/pip.log"; exit 1
fi
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null | tee "$out/nvidia-smi.txt"
python3 -m benchmarks.gpu_check --out "$out" "$@" 2>&1 | tee "$out/gpu_check.log"
