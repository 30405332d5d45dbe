#!/usr/bin/env bash
# The GPU benchmark runs recorded in experiments/results/bench_gpu_*.json, and the bf16
# accuracy check recorded in experiments/results/mixed_precision_digits.json.
# Usage: bash experiments/gpu_bench.sh OUTDIR [train|all]
#   (needs jax[cuda], flax, optax, orbax, ml-collections, scikit-learn, torch; no tensorflow)
set -euo pipefail
out=${1:?usage: gpu_bench.sh OUTDIR [train|all]}
what=${2:-all}
mkdir -p "$out"
b="python -m experiments.bench --torch --steps=20 --warmup=3"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
$b --batch=128 --modes=sgd,sam,at,sam_at --pgd_steps=10 --sections=train,pgd,eval \
   --json="$out/bench_gpu_b128_f32_k10.json"
$b --batch=128 --modes=sgd,sam,at --pgd_steps=5 --sections=train \
   --json="$out/bench_gpu_b128_f32_k5.json"
for batch in 128 512 1024; do
  $b --batch=$batch --modes=sgd,sam,at --pgd_steps=10 --sections=train --half_precision \
     --json="$out/bench_gpu_b${batch}_bf16_k10.json"
done
[ "$what" = all ] || exit 0
# Mixed precision leaves accuracy unchanged: the same SAM run on digits in f32 and bf16.
for p in f32 bf16; do
  flag=$([ $p = bf16 ] && echo --config.half_precision || true)
  python -m samrobust.main --config=configs/sam.py:digits --workdir="$out/digits_$p" $flag
done
python - "$out" <<'PY'
import json, sys
out = sys.argv[1]
res = {p: json.load(open(f"{out}/digits_{p}/results.json")) for p in ("f32", "bf16")}
summary = {p: {"accuracy": r["accuracy"], "train_images_per_s": r["train_images_per_s"]}
           for p, r in res.items()}
json.dump(summary, open(f"{out}/mixed_precision_digits.json", "w"), indent=2)
for k in res["f32"]["accuracy"]:
    print(f"{k:24s} f32 {res['f32']['accuracy'][k]:.4f}  bf16 {res['bf16']['accuracy'][k]:.4f}")
PY
