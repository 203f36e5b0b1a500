#!/bin/bash
# Greedy tokens of the GPU path against references, on one GPU (kind nvidia-h200;
# carry [".whl", ".anchors"]):  bash bench/gpu/correctness_run.sh
# 1. ours installed into /tmp/site (install.sh) while the 1.5B model is built;
# 2. kernel_check.py (each Triton op against its PyTorch reference);
# 3. prefix_check.py tiny, then big (the paged runtime against the dynamic cache,
#    in-process, prompts arriving while others run);
# 4. with LATENCY=1, latency_bench.py's prefix case through mii.serve, prefix cache on
#    and off (digests of every greedy text; compare them with summarize or by eye).
# Work files go to /tmp/o (the tiny model is built there); the JSON lines and the log
# are copied to the tool's $OUT as each step ends, so a timeout keeps what finished.
set -u
REPO=$(cd "$(dirname "$0")/../.." && pwd)
cd "$REPO" || exit 1
DEST=${OUT:-/tmp/correctness_out}
export OUT=/tmp/o PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false TORCH_CUDA_ARCH_LIST=9.0 DS_BUILD_OPS=0
export MII_HOME=${MII_HOME:-/tmp/mii_home} CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
export MODEL_DIR=/tmp/llama1b VOCAB=128000
mkdir -p "$OUT" "$DEST"
exec > >(tee -a "$OUT/run.log") 2>&1
START=$(date +%s)
stamp() { echo "=== $(( $(date +%s) - START ))s: $*"; cp "$OUT"/*.jsonl "$OUT/run.log" "$DEST"/ 2>/dev/null; }
[ -f "$MODEL_DIR/config.json" ] || { python3 bench/gpu/anchors.py build > "$OUT/build.log" 2>&1; } &
build_pid=$!
SITE=/tmp/site PY=python3 bash bench/gpu/install.sh > "$OUT/install.log" 2>&1
stamp "ours installed rc=$? ($(tail -1 "$OUT/install.log" | cut -c1-200))"
export PYTHONPATH=/tmp/site:$REPO
timeout 120 python3 bench/gpu/kernel_check.py > "$OUT/kernels.log" 2>&1
stamp "kernel check rc=$? $(grep -c '"ok": false' "$OUT/kernels.log") failing"
timeout 150 python3 bench/gpu/prefix_check.py tiny 2>&1 | grep -v '^\[' | tail -12
stamp "prefix check tiny done"
wait $build_pid
stamp "model ready"
timeout 200 python3 bench/gpu/prefix_check.py big 2>&1 | grep -v '^\[' | tail -12
stamp "prefix check big done"
if [ "${LATENCY:-0}" = 1 ]; then
  CASES=prefix timeout 150 python3 bench/gpu/latency_bench.py 2>&1 | grep -v '^\[' | tail -6
  stamp "prefix latency done"
  LABEL=no_prefix_cache CASES=prefix SERVE_EXTRA='{"prefix_caching": false}' \
    timeout 150 python3 bench/gpu/latency_bench.py 2>&1 | grep -v '^\[' | tail -6
  stamp "prefix latency without prefix cache done"
fi
ps -eo pid,args | grep -F "$MII_HOME/deployments" | grep -v grep && echo "=== WARNING: processes of ours left"
stamp "end"
