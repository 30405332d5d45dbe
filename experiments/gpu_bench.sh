#!/usr/bin/env bash
# The GPU benchmark runs recorded in experiments/results/bench_gpu_*.json.
# Usage: bash experiments/gpu_bench.sh OUTDIR   (needs jax[cuda], flax, optax, orbax, torch)
set -euo pipefail
out=${1:?usage: gpu_bench.sh OUTDIR}
mkdir -p "$out"
b="python experiments/bench.py --torch --steps=20 --warmup=3"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
$b --batch=128 --modes=sgd,sam,at,sam_at --pgd_steps=10 --sections=train,pgd,eval \
   --json="$out/bench_gpu_b128_f32_k10.json"
$b --batch=128 --modes=sgd,sam,at --pgd_steps=5 --sections=train \
   --json="$out/bench_gpu_b128_f32_k5.json"
for batch in 128 512 1024; do
  $b --batch=$batch --modes=sgd,sam,at --pgd_steps=10 --sections=train --half_precision \
     --json="$out/bench_gpu_b${batch}_bf16_k10.json"
done
