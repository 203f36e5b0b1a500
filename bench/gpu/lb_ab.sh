#!/bin/bash
# A/B on one GPU (carry [".whl", ".anchors"]): the 63-stream ITL of latency_bench.py's itl_long
# through the current load balancer and through the one before issue 20's forwarding, on
# the same machine and model, alternated. Build the old side first, here:
#   rm -rf ab_old && mkdir ab_old && cp -r mii mii_core mii_engines ab_old/ &&
#   git archive 10b30ca^ mii_transport | tar -x -C ab_old/
# then run `bash bench/gpu/lb_ab.sh`; results in /tmp/o_8/latency.jsonl.
set -u
REPO=$(cd "$(dirname "$0")/../.." && pwd); cd "$REPO" || exit 1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export DS_BUILD_OPS=0 NCCL_NVLS_ENABLE=0 CUDA_VISIBLE_DEVICES=0 MII_HOME=/tmp/mh8 OUT=/tmp/o_8
export MODEL_DIR=/tmp/llama1b VOCAB=128000
mkdir -p $OUT
python3 bench/gpu/anchors.py build > $OUT/build.log 2>&1 &
SITE=/tmp/site PY=python3 bash bench/gpu/install.sh > $OUT/install.log 2>&1; echo "install rc=$?"
wait
for label in new old new2 old2; do
  case $label in old*) PP=$REPO/ab_old:/tmp/site ;; *) PP=/tmp/site:$REPO ;; esac
  LABEL=$label CASES="itl_long" PYTHONPATH=$PP timeout 200 python3 bench/gpu/latency_bench.py 2>&1 | grep RESULT | grep -v '"info"' | cut -c1-400
done
