#!/bin/bash
# Fast by default, on one GPU (device kind nvidia-h200; carry [".whl", ".anchors"]):
#   bash bench/gpu/defaults_run.sh [MODEL]      # MODEL: llama1b (default) or mistral7b
# 1. ours installed into /tmp/site (install.sh), FastGen (.anchors/whl) into /tmp/site_mii;
#    the model built meanwhile (anchors.py build / the Mistral-7B shape);
# 2. FastGen's CUDA ops JIT-compiled in the background (they take ~170 s on a fresh
#    machine), while the paged kernels are checked and ours warms up; the timed runs wait
#    for it (WAIT_FOR), so that no compilation shares the CPU with a measurement;
# 3. ours with mii.serve(model) defaults, then FastGen, same prompts (workload_bench.py).
# Env: OURS_CASES, FASTGEN_CASES, SERVE_EXTRA (JSON), SKIP_FASTGEN=1, SKIP_KERNELS=1,
# SECOND_SERVE=1 (serve the model a second time: ready with the compile caches warm),
# PROBE_VARIANTS (probe_paged.py), RETRY_EXTRA (a second config if ours fails),
# LATENCY=1 (latency_bench.py: TTFT, ITL under a long prompt, prefix cache on / off),
# SAMPLING_CHECK=1 (sampling_check.py: the sampling kernel checked and timed),
# VARLEN_TILES=1 (varlen_tiles.py: the prefill attention's tile candidates),
# IMPORT_TIMES=1 (seconds of torch, CUDA init, transformers, deepspeed; -X importtime),
# SPY=1 (py-spy samples the second serve's replica from its start: spy_second.txt, raw
# stacks with thread names; needs the py-spy wheel carried in .spy/).
# VARIANTS="label=JSON;label=JSON" (serve settings timed after the defaults, on
# VARIANT_CASES, default "long"; with LATENCY=1 also their ttft4k and itl_long).
# Results under $OUT: workload.jsonl, latency.jsonl, kernels.jsonl, sampling.jsonl, run.log,
# logs.tgz (the deployments' logs).
set -u
REPO=$(cd "$(dirname "$0")/../.." && pwd)
cd "$REPO" || exit 1
WHICH=${1:-llama1b}
export OUT=${OUT:-/tmp/defaults_out} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export TORCH_CUDA_ARCH_LIST=9.0 DS_BUILD_OPS=0  # TOKENIZERS_PARALLELISM left unset, as a user leaves it
export MII_HOME=${MII_HOME:-/tmp/mii_home} NCCL_NVLS_ENABLE=0
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/run.log") 2>&1
START=$(date +%s)
stamp() { echo "=== $(( $(date +%s) - START ))s: $*"; }
IMAGE_PYTHONPATH=${PYTHONPATH:-}
if [ "$WHICH" = mistral7b ]; then
  export MODEL_DIR=/tmp/mistral7b VOCAB=32000
  build() { PYTHONPATH=$IMAGE_PYTHONPATH SYSTEM=build_mistral MODEL_DIR=$MODEL_DIR python3 .anchors/workload.py; }
else
  export MODEL_DIR=/tmp/llama1b VOCAB=128000
  build() { PYTHONPATH=$IMAGE_PYTHONPATH python3 bench/gpu/anchors.py build; }
fi
stamp "start: $(nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader)"
[ -f "$MODEL_DIR/config.json" ] || { build > "$OUT/build.log" 2>&1; stamp "model built rc=$?"; } &
build_pid=$!
SITE=/tmp/site PY=python3 bash bench/gpu/install.sh > "$OUT/install.log" 2>&1
stamp "ours installed rc=$? ($(tail -1 "$OUT/install.log" | cut -c1-200))"
JIT_DONE=/tmp/fastgen_jit.done
if [ "${SKIP_FASTGEN:-0}" != 1 ] && [ ! -f $JIT_DONE ]; then
  ( python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site_mii .anchors/whl/*.whl \
      > "$OUT/fastgen_jit.log" 2>&1
    export PYTHONPATH=/tmp/site_mii:/tmp/site MAX_JOBS=4
    for b in InferenceCoreBuilder RaggedOpsBuilder RaggedUtilsBuilder InferenceCutlassBuilder; do
      python3 -c "from deepspeed.ops.op_builder import $b as B; B().load()" >> "$OUT/fastgen_jit.log" 2>&1 &
    done
    wait; touch $JIT_DONE ) &
  stamp "FastGen JIT started in the background"
else
  touch $JIT_DONE
fi
export PYTHONPATH=/tmp/site:$REPO
if [ "${SKIP_KERNELS:-0}" != 1 ]; then
  timeout 240 python3 bench/gpu/kernel_check.py > "$OUT/kernels.log" 2>&1
  stamp "kernel check rc=$? $(grep -c '"ok": false' "$OUT/kernels.log") failing; $(grep time_decode "$OUT/kernels.log" | cut -c1-160 | tr '\n' ' ')"
fi
if [ "${SAMPLING_CHECK:-0}" = 1 ]; then
  timeout 120 python3 bench/gpu/sampling_check.py > "$OUT/sampling.log" 2>&1
  stamp "sampling check rc=$? $(grep -c '"ok": false' "$OUT/sampling.log") failing"
fi
if [ "${VARLEN_TILES:-0}" = 1 ]; then
  timeout 240 python3 bench/gpu/varlen_tiles.py > "$OUT/varlen_tiles.log" 2>&1
  stamp "varlen tiles rc=$? $(grep -c '"ok": false' "$OUT/varlen_tiles.log") failing"
fi
if [ "${IMPORT_TIMES:-0}" = 1 ]; then  # what a replica's start spends before loading
  python3 -c "import time; t = time.time(); import torch; a = time.time(); torch.cuda.set_device(0); b = time.time(); import transformers; from transformers import AutoModelForCausalLM; c = time.time(); import deepspeed; d = time.time(); print('RESULT', {'kind': 'import_times', 'torch_s': round(a - t, 2), 'cuda_init_s': round(b - a, 2), 'transformers_s': round(c - b, 2), 'deepspeed_s': round(d - c, 2)})" 2>&1 | grep RESULT
  python3 -c "import os, sys, transformers; d = os.path.dirname(transformers.__file__); c = os.path.join(d, '__pycache__'); print('RESULT', {'kind': 'bytecode', 'PYTHONDONTWRITEBYTECODE': os.environ.get('PYTHONDONTWRITEBYTECODE'), 'dont_write': sys.flags.dont_write_bytecode, 'pycache_prefix': sys.pycache_prefix, 'transformers_dir': d, 'pyc_files': len(os.listdir(c)) if os.path.isdir(c) else None, 'writable': os.access(d, os.W_OK)})"
  for again in 1 2; do python3 -c "import time; t = time.time(); import transformers; from transformers import AutoModelForCausalLM; print('RESULT', {'kind': 'transformers_import_again', 'seconds': round(time.time() - t, 2)})"; done
  python3 -X importtime -c "import torch; from transformers import AutoModelForCausalLM" 2> "$OUT/importtime.log" >/dev/null
  sort -t'|' -k2 -n -r "$OUT/importtime.log" | head -25
fi
wait $build_pid
stamp "model ready"
if [ -n "${PROBE_VARIANTS:-}" ]; then  # in-process step times and kernel tables (probe_paged.py)
  timeout 300 python3 bench/gpu/probe_paged.py $PROBE_VARIANTS 2>&1 | grep -v '^\[' | grep 'RESULT\|Error\|Self CUDA\|^ *[a-z_:A-Z]' | head -60
  stamp "probe done"
fi
LABEL=ours_defaults SYSTEM=ours CASES="${OURS_CASES:-c128 mixed128 mixed512}" WAIT_FOR=$JIT_DONE \
  timeout 420 python3 bench/gpu/workload_bench.py
rc=$?
stamp "ours done rc=$rc"
if [ $rc != 0 ] && [ -n "${RETRY_EXTRA:-}" ]; then  # which part failed: e.g. '{"torch_compile": false}'
  grep -h 'Error\|error' "$MII_HOME"/logs/*.log 2>/dev/null | tail -5
  LABEL=ours_retry SYSTEM=ours CASES=c128 SERVE_EXTRA=$RETRY_EXTRA timeout 300 python3 bench/gpu/workload_bench.py
  stamp "retry done rc=$?"
fi
IFS=';' read -ra variants <<< "${VARIANTS:-}"
for variant in "${variants[@]}"; do  # the same cases under other serve settings
  label=${variant%%=*} extra=${variant#*=}
  LABEL=$label SYSTEM=ours CASES="${VARIANT_CASES:-long}" SERVE_EXTRA=$extra WAIT_FOR=$JIT_DONE \
    timeout 300 python3 bench/gpu/workload_bench.py 2>&1 | grep '"case"' | cut -c1-300
  stamp "variant $label done"
  if [ "${LATENCY:-0}" = 1 ]; then
    LABEL=$label CASES="ttft4k itl_long" SERVE_EXTRA=$extra \
      timeout 200 python3 bench/gpu/latency_bench.py 2>&1 | grep '"case"' | cut -c1-400
    stamp "variant $label latency done"
  fi
done
if [ "${SECOND_SERVE:-0}" = 1 ]; then  # the same model again: compile caches under $MII_HOME
  if [ "${SPY:-0}" = 1 ]; then  # attach to the new replica as soon as it exists
    python3 -m pip install -q --no-index --no-deps --target /tmp/spy .spy/*.whl
    ( for _ in $(seq 600); do
        pid=$(pgrep -n -f replica_main) && break; sleep 0.05
      done
      [ -n "${pid:-}" ] && /tmp/spy/bin/py-spy record -r 100 --idle --threads --nonblocking \
        -f raw -o "$OUT/spy_second.txt" -p "$pid" > "$OUT/spy.log" 2>&1 ) &
  fi
  LABEL=ours_defaults_second SYSTEM=ours CASES=c128 timeout 300 python3 bench/gpu/workload_bench.py
  stamp "second serve done rc=$?"
fi
if [ "${LATENCY:-0}" = 1 ]; then  # issue 17's latency cases (latency_bench.py), then prefix off
  CASES="${LATENCY_CASES:-ttft4k itl_long prefix}" timeout 300 python3 bench/gpu/latency_bench.py 2>&1 | grep -v '^\[' | tail -20
  stamp "latency done rc=$?"
  if [[ " ${LATENCY_CASES:-prefix} " == *" prefix "* ]]; then
    LABEL=no_prefix_cache CASES=prefix SERVE_EXTRA='{"prefix_caching": false}' \
      timeout 200 python3 bench/gpu/latency_bench.py 2>&1 | grep -v '^\[' | tail -8
    stamp "latency without prefix cache done rc=$?"
  fi
fi
grep -h '\[progress\]\|WARNING\|Error' "$MII_HOME"/logs/*.log 2>/dev/null | tail -40
if [ "${SKIP_FASTGEN:-0}" != 1 ]; then
  LABEL=fastgen SYSTEM=fastgen CASES="${FASTGEN_CASES:-c128 mixed128}" PYTHONPATH=/tmp/site_mii:/tmp/site \
    timeout 300 python3 bench/gpu/workload_bench.py 2>&1 | grep -v '^\[' | tail -30
  stamp "fastgen done"
fi
tar czf "$OUT/logs.tgz" -C "$MII_HOME" logs 2>/dev/null  # every process's log, timestamped
ps -eo pid,args | grep -F "$MII_HOME/deployments" | grep -v grep && echo "=== WARNING: processes of ours left"
grep -h RESULT "$OUT"/*.log 2>/dev/null | grep -v '"kind": "check"' | cut -c1-400
stamp "end"
