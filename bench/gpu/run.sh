#!/bin/bash
# The GPU benchmark in one command (device: nvidia-h100-x2; carry [".whl"]):
#   bash bench/gpu/run.sh                 # B_ds B_tf A_hf C_tp2 C_rep (in this order)
#   bash bench/gpu/run.sh C_tp2 C_rep     # a subset
# install (carried wheels -> $SITE, skipped when already done on a warm machine) and build
# (the 1.50B model -> $MODEL_DIR, skipped when it exists; runs on the image's packages
# alone, in parallel with install) always come first. Every phase is its own process
# under `timeout`, limited by what is left of BENCH_BUDGET_S (default 540 s from the
# start); after each phase cleanup.py stops any deployment of ours still alive.
# Results: $OUT/gpu_bench.jsonl, $OUT/summary.txt, $OUT/bench.log (all output),
# $OUT/deploy_logs.txt (log tails of failed deployments).
# CPU dry run: BENCH_TINY=1 NO_INSTALL=1 PY=.venv/bin/python bash bench/gpu/run.sh
set -u
REPO=$(cd "$(dirname "$0")/../.." && pwd)
cd "$REPO" || exit 1
START=$(date +%s)
BUDGET=${BENCH_BUDGET_S:-540}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 DS_BUILD_OPS=0
export TOKENIZERS_PARALLELISM=false MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MII_HOME=${MII_HOME:-/tmp/mii_home}
export OUT=${OUT:-/tmp/gpu_bench_out}
export PY=${PY:-python3} SITE=${SITE:-/tmp/site}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/bench.log") 2>&1
IMAGE_PYTHONPATH=${PYTHONPATH:-}
if [ "${NO_INSTALL:-0}" = 1 ]; then
  export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$SITE:$REPO
fi
if [ "${BENCH_TINY:-0}" = 1 ]; then
  export MODEL_DIR=${MODEL_DIR:-/tmp/mii_tiny_bench}
else
  export MODEL_DIR=${MODEL_DIR:-/tmp/llama1b}
fi
PHASES=${*:-"B_ds B_tf A_hf C_tp2 C_rep"}
echo "=== gpu bench $(date -u +%FT%TZ) phases: $PHASES budget ${BUDGET}s model $MODEL_DIR"
nvidia-smi -L 2>/dev/null || echo "(no nvidia-smi)"
GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
# mii counts GPUs from CUDA_VISIBLE_DEVICES, else /proc/driver/nvidia/gpus, which a
# sandboxed runtime may not show: name them so that no deployment lands on the CPU.
if [ -z "${CUDA_VISIBLE_DEVICES:-}" ] && [ "${GPUS:-0}" -gt 0 ]; then
  [ -d /proc/driver/nvidia/gpus ] || echo "=== note: no /proc/driver/nvidia/gpus here"
  export CUDA_VISIBLE_DEVICES=$(seq -s, 0 $(( GPUS - 1 )))
fi
echo "=== GPUs: ${GPUS:-0}, CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-unset}"

jline() { printf '%s\n' "$1" >> "$OUT/gpu_bench.jsonl"; echo "RESULT $1"; }
phase_end() { jline "{\"kind\":\"phase_end\",\"name\":\"$1\",\"rc\":\"$2\",\"seconds\":$3,\"limit_s\":$4}"; }

run_phase() {  # NAME MAX_SECONDS COMMAND...
  local name=$1 max=$2; shift 2
  local left=$(( START + BUDGET - $(date +%s) ))
  local limit=$(( max < left ? max : left ))
  if [ "$limit" -lt 25 ]; then
    echo "=== skip $name: ${left}s left of the budget"
    phase_end "$name" "skipped: budget" 0 "$limit"
    return
  fi
  echo "=== phase $name (limit ${limit}s) at $(date +%T)"
  local t0=$(date +%s)
  timeout -k 15 "$limit" "$@"
  local rc=$?
  timeout 30 "$PY" bench/gpu/cleanup.py "$name"
  phase_end "$name" "$rc" $(( $(date +%s) - t0 )) "$limit"
}

timeout 30 "$PY" bench/gpu/cleanup.py pre 2>/dev/null  # leftovers of an earlier call on a warm machine

# build: the image's own packages suffice (nothing from $SITE), so it overlaps install.
build_pid=
if [ ! -f "$MODEL_DIR/config.json" ]; then
  echo "=== phase build (background, limit 150s) at $(date +%T)"
  ( t0=$(date +%s)
    if [ "${BENCH_TINY:-0}" = 1 ]; then timeout -k 10 150 "$PY" bench/gpu/anchors.py build
    else PYTHONPATH=$IMAGE_PYTHONPATH timeout -k 10 150 "$PY" bench/gpu/anchors.py build; fi
    rc=$?; phase_end build "$rc" $(( $(date +%s) - t0 )) 150 ) &
  build_pid=$!
else
  echo "=== build: $MODEL_DIR exists"
fi
if [ "${NO_INSTALL:-0}" != 1 ]; then
  run_phase install 150 bash bench/gpu/install.sh
fi
[ -n "$build_pid" ] && wait "$build_pid"

for phase in $PHASES; do
  case $phase in
    B_ds) run_phase B_ds 170 "$PY" bench/gpu/serving_bench.py ours --engine deepspeed ;;
    B_tf) run_phase B_tf 130 "$PY" bench/gpu/serving_bench.py ours --engine transformers ;;
    A_hf) run_phase A_hf 200 "$PY" bench/gpu/anchors.py hf ;;
    C_tp2|C_rep)
      if [ "${BENCH_TINY:-0}" != 1 ] && [ "${GPUS:-0}" -lt 2 ]; then
        phase_end "$phase" "skipped: $GPUS GPU(s)" 0 0
      elif [ "$phase" = C_tp2 ]; then
        run_phase C_tp2 150 "$PY" bench/gpu/serving_bench.py tp2 --engine deepspeed
      else
        run_phase C_rep 130 "$PY" bench/gpu/serving_bench.py replicas --engine deepspeed
      fi ;;
    C_fp32) run_phase C_fp32 150 "$PY" bench/gpu/serving_bench.py greedy_fp32 --engine deepspeed ;;
    D_static) run_phase D_static 330 "$PY" bench/gpu/static_bench.py ${STATIC_CONFIGS:-} ;;
    D_static_*) run_phase "$phase" 330 "$PY" bench/gpu/static_bench.py ${phase#D_static_} ;;
    P_probe) run_phase P_probe 300 "$PY" bench/gpu/probe_paged.py ${PROBE_VARIANTS:-} ;;
    *) echo "unknown phase $phase (known: B_ds B_tf A_hf C_tp2 C_rep, optional C_fp32 D_static D_static_<config> P_probe)" ;;
  esac
done
# Report (never kill by name) any process of a deployment under our MII_HOME still running.
left_over=$(ps -eo pid,args | grep -F "$MII_HOME/deployments" | grep -v grep)
[ -n "$left_over" ] && echo "=== WARNING: mii processes of ours still running:" && echo "$left_over"
echo "=== total $(( $(date +%s) - START ))s"
"$PY" bench/gpu/summarize.py --write
