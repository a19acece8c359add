#!/usr/bin/env bash
# The GPU checks of issue 14 as one script, for a machine with a CUDA GPU (run from the repo root).
#
#   bash bench/gpu_check.sh [WIKITEXT_DIR] [quick|big|all]   # results and logs under $OUT (default bench/results/gpu)
#
# quick: the tests and the 2-layer GPU run (a minute); big: the 32-layer GPU run and the 2-layer
# CPU run; all (default): both.
#
# 1. tests/recipe/test_stream_device.py: every streamable pass onloaded to the GPU layer by layer
#    (fp32 there equals the CPU up to rounding; bf16 is no further from the CPU's result than the
#    CPU's result is from the original).
# 2. bench/stream_big.py: streamed GPTQ W4 g128 of the Llama-2-7B shape (32 layers, random bf16
#    weights) with --device cuda and `--plan-only`'s prediction for it, then the same 2-layer cut
#    on the GPU and on this machine's CPUs, so the per-layer speed-up is measured in one run on
#    one machine.
# kompakt needs only to be importable (PYTHONPATH=src): the machine may have no package index.
set -u
OUT=${OUT:-bench/results/gpu}
DATA=${1:-../shared/data/wikitext2}
PART=${2:-all}
THREADS=$(nproc)
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"

if [ "$PART" != big ]; then
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/recipe/test_stream_device.py 2>&1 \
  | tail -40 | tee "$OUT/pytest.log"
fi

run() {  # name, timeout, stream_big arguments...
  local name=$1 limit=$2
  shift 2
  timeout "$limit" python3 bench/stream_big.py --preset llama2-7b --export none --ppl-tokens 0 --data "$DATA" \
    --threads "$THREADS" --work "/tmp/kompakt-$name" "$@" 2>&1 | tail -12 | tee "$OUT/$name.log"
}
if [ "$PART" != big ]; then
  run gpu-2L 120 --device cuda --layers 2 && cp bench/results/stream_big-llama2-7b-2L-cuda.json "$OUT/"
fi
[ "$PART" = quick ] && exit 0
run gpu-32L 420 --device cuda --keep && cp bench/results/stream_big-llama2-7b-cuda.json "$OUT/"
# the plan's prediction for the run just measured (kompakt.calib.gpu_plan), then the model goes
cat > /tmp/gpu-plan.yaml <<YAML
model: /tmp/kompakt-gpu-32L/model
data: {calibration: $DATA/wiki.valid.tokens, calibration_blocks: 16, block_len: 512}
steps:
  - quant.gptq: {bits: 4, group_size: 128, symmetric: true, batch_size: 4}
YAML
python3 -m kompakt compress --recipe /tmp/gpu-plan.yaml --max-memory 3GB --device cuda --plan-only 2>&1 \
  | tee "$OUT/gpu-plan.log"
rm -rf /tmp/kompakt-gpu-32L
run cpu-2L 240 --device cpu --layers 2 && cp bench/results/stream_big-llama2-7b-2L.json "$OUT/stream_big-llama2-7b-2L-cpu$THREADS.json"
