#!/usr/bin/env bash
# Seed 0 of the whole cifar10_fast grid on one GPU (experiments/grids.py: SGD, SAM rho
# 0.05-0.4, Linf AT 2/255 and 8/255, L2 AT 32/255; the fast recipe, configs/<mode>.py:fast),
# with every evaluation the grid reports: the paper suite on all 10,000 test images (each
# run's own), then AutoAttack standard on the 1,000-point evaluation subset at Linf 2/255,
# Linf 8/255 and L2 0.5, then the report.
#
# Usage: bash experiments/gpu_cifar10_fast.sh OUTDIR DATA
#   DATA: the CIFAR-10 image folder or archive (../shared/data/cifar10-jpeg.tar.gz).
#   Environment: EXTRA (more overrides for every run, e.g. a tiny CPU check:
#   EXTRA="--override=width=4 --override=train_examples=1024 --override=num_epochs=1
#   --override=eval_num_examples=100 --override=eval_pgd_steps=1"), AA_N (default 1000),
#   AA_FLAGS (e.g. "--eval_flag=--n_iter=5" for that check), WHEELS (default .whl:
#   wheels installed first when ml_collections is missing).
# Runs (with checkpoints) go to OUTDIR/runs, the report to OUTDIR, times to OUTDIR/timings.txt.
set -euo pipefail
usage="usage: gpu_cifar10_fast.sh OUTDIR DATA"
out=${1:?$usage}
data=${2:?$usage}
py=${PYTHON:-python3}
mkdir -p "$out/runs"
if ! $py -c "import ml_collections" 2>/dev/null; then
  $py -m pip install --no-index --no-deps "${WHEELS:-.whl}"/*.whl
fi
stamp() { echo "$(date -u +%FT%TZ) $*" | tee -a "$out/timings.txt"; }
read -r -a extra <<< "${EXTRA:-}"
read -r -a aa_flags <<< "${AA_FLAGS:-}"
sweep=($py -m experiments.sweep --grid=cifar10_fast "--root=$out/runs" --seeds=1
       "--override=data_dir=$data" "${extra[@]}")
stamp "start: $($py -c 'import jax; print(jax.__version__, jax.devices())')"
"${sweep[@]}" 2>&1 | tee -a "$out/train.log"
stamp "trained"
for budget in "linf 2/255" "linf 8/255" "l2 0.5"; do
  read -r norm eps <<< "$budget"
  "${sweep[@]}" --eval=autoattack "--eval_flag=--norm=$norm" "--eval_flag=--eps=$eps" \
    "--eval_flag=--num_examples=${AA_N:-1000}" "${aa_flags[@]}" 2>&1 | tee -a "$out/eval.log"
  stamp "autoattack $norm $eps"
done
n=${AA_N:-1000}
$py -m experiments.report "--root=$out/runs" "--out=$out" --robust_key=pgd10_ce_linf_2/255 \
  --robust_key=pgd10_ce_l2_32/255 "--robust_key=autoattack_sub$n:autoattack_linf_2/255" \
  "--robust_key=autoattack_sub$n:autoattack_linf_8/255" \
  "--robust_key=autoattack_sub$n:autoattack_l2_0.5" | tee -a "$out/report.log"
stamp "all done"
