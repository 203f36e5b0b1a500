#!/bin/bash
# Issue 17's long-prompt case in-process (probe_paged.py, LONG=1) on this checkout and on
# another tree, one after the other on one GPU; the paged kernels are checked first.
#   bash bench/gpu/long_ab.sh            # device kind nvidia-h200; carry [".whl", ".ab"]
# The other tree: .ab/old (AB_OLD), made here with
#   mkdir -p .ab/old && git archive COMMIT mii mii_core mii_engines mii_transport proto | tar -x -C .ab/old
# (this checkout's probe_paged.py is run in both). AB_BUDGETS: decoding budgets to run on
# this checkout as well (e.g. "4096"). Results: $OUT/probe_paged.jsonl, run.log.
set -u
REPO=$(cd "$(dirname "$0")/../.." && pwd)
cd "$REPO" || exit 1
export OUT=${OUT:-/tmp/long_ab} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export DS_BUILD_OPS=0 NCCL_NVLS_ENABLE=0
export MODEL_DIR=/tmp/llama1b CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
OLD=${AB_OLD:-$REPO/.ab/old}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/run.log") 2>&1
START=$(date +%s)
stamp() { echo "=== $(( $(date +%s) - START ))s: $*"; }
IMAGE_PYTHONPATH=${PYTHONPATH:-}
[ -f "$MODEL_DIR/config.json" ] || { PYTHONPATH=$IMAGE_PYTHONPATH python3 bench/gpu/anchors.py build > "$OUT/build.log" 2>&1; stamp "model built rc=$?"; } &
build_pid=$!
SITE=/tmp/site PY=python3 bash bench/gpu/install.sh > "$OUT/install.log" 2>&1
stamp "ours installed rc=$?"
export PYTHONPATH=/tmp/site
timeout 150 python3 bench/gpu/kernel_check.py > "$OUT/kernels.log" 2>&1
stamp "kernel check rc=$? $(grep -c '"ok": false' "$OUT/kernels.log") failing"
wait $build_pid
probe() {  # TREE SUFFIX [ENV...]
  local tree=$1 suffix=$2; shift 2
  mkdir -p "$tree/bench/gpu" && cp bench/gpu/probe_paged.py "$tree/bench/gpu/"
  ( cd "$tree" && env "$@" LONG=1 VARIANT_SUFFIX="$suffix" timeout 240 python3 bench/gpu/probe_paged.py compiled ) \
    > "$OUT/probe$suffix.log" 2>&1
  stamp "probe $suffix rc=$? $(grep RESULT "$OUT/probe$suffix.log" | cut -c1-400 | tr '\n' ' ')"
}
probe "$REPO" _new
[ -d "$OLD/mii_engines" ] && probe "$OLD" _old
for budget in ${AB_BUDGETS:-}; do probe "$REPO" "_new_b$budget" DECODING_BUDGET=$budget; done
stamp done
