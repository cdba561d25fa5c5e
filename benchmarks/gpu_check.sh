#!/usr/bin/env bash
# Everything issues 18 and 27 want measured on a GPU, in <= 5 minutes, each part independent.
#
#   OUT=/some/dir PYTHONPATH=. bash benchmarks/gpu_check.sh
#
# Made for a lent machine with its own JAX (seen: 0.11.2, CUDA 13, Python 3.12, no grain or
# datasets, no internet): synthetic batches only. Each part runs under its own timeout and
# writes $OUT/<part>.txt as it goes; $OUT/summary.txt gets one line per part (rc, seconds).
# A part that fails or times out does not stop the next one.
set -u
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # peak memory figures mean what the step used
PY=${PYTHON:-python3}

part() {  # part NAME SECONDS COMMAND...
  local name=$1 limit=$2 start rc
  shift 2
  start=$(date +%s)
  echo "== $name (limit ${limit}s): $*" | tee "$OUT/$name.txt"
  timeout -k 5 "$limit" "$@" >> "$OUT/$name.txt" 2>&1
  rc=$?
  echo "$name rc=$rc $(( $(date +%s) - start ))s" | tee -a "$OUT/summary.txt" >> "$OUT/$name.txt"
  tail -n 4 "$OUT/$name.txt"
}

part env 30 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; \
  $PY -c 'import jax, jaxlib; print(jax.__version__, jaxlib.__version__, jax.devices())'"
# The kernel tests compiled for the GPU; float32 at full precision (TF32 would miss 1e-5).
part kernel_tests 110 env JAX_DEFAULT_MATMUL_PRECISION=highest $PY -m pytest -x -q \
  -p no:cacheprovider tests/test_flash_attention.py tests/test_pallas_attention.py tests/test_chunked_cross_entropy.py \
  tests/test_kernels.py -k "not plain_model"
# Attention forward + backward: plain XLA, blocked, flash (Pallas when present) vs
# jax.nn.dot_product_attention (XLA's and cuDNN's, which have no sinks).
part attention_bench 50 $PY benchmarks/bench_attention.py --lengths 1024,4096 --batch 16 \
  --impls plain,blocked,flash,pallas,dpa,dpa_cudnn --dtype bfloat16 --rounds 5
# The medium train step (tok/s, MFU against the measured f32 peak, peak memory) at 512 and 4000.
part train_medium_512 55 $PY benchmarks/bench_train.py --configs medium --steps 3
part train_medium_4k 55 $PY benchmarks/bench_train.py --configs medium_4k --steps 3
# Expert parallelism (kernels/expert_parallel.py) on this machine's devices (one: all_to_all is
# the identity) against the sorted dispatch: equal gradients, forward + backward time; dropless
# (a slot for every token) and at capacity 1.25 (drops counted).
part expert_parallel 30 $PY benchmarks/expert_parallel_step.py --tokens 16384
part expert_parallel_capacity 25 $PY benchmarks/expert_parallel_step.py --tokens 16384 \
  --capacity 1.25
# LoRA (issue 24): the adapters' step beside the full step above, and one QLoRA step's device
# memory at gpt-oss-20b (abstract weights; this GPU's buffer assignment, not the CPU's).
part train_medium_lora 45 $PY benchmarks/bench_train.py --configs medium --steps 3 --lora-rank 8
part finetune_memory_20b 60 $PY benchmarks/finetune_memory.py --target host --models 20b --formats mxfp4
# Batch-1 decode at gpt-oss-20b widths (2 layers), MXFP4 kept vs dequantized to bf16.
part decode_20b_keep 45 $PY benchmarks/pretrained_decode.py --layers 2 --new-tokens 64
if [ -f benchmarks/mxfp4_moe.py ]; then
  part mxfp4_moe 40 $PY benchmarks/mxfp4_moe.py
fi
echo "done; results in $OUT" | tee -a "$OUT/summary.txt"
