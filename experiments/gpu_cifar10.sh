#!/usr/bin/env bash
# The full-recipe CIFAR-10 run on one GPU: PreActResNet-18 at full width (64) on all 50,000
# train images of the JPEG copy, bf16, batch 128, the paper's lr schedule compressed to
# EPOCHS, for SGD, SAM rho 0.1 and Linf AT 8/255 (PGD-5); then the paper's PGD-10 suite on
# all 10,000 test images and AutoAttack (standard, Linf 8/255) on the first AA_N of them.
#
# Usage: bash experiments/gpu_cifar10.sh OUTDIR DATA [EPOCHS]
#   DATA: the CIFAR-10 image folder or archive (../shared/data/cifar10-jpeg.tar.gz).
#   EPOCHS (default 15): about 8 s an epoch for the three methods together on an H100
#   (bf16 batch 128: SGD 44k, SAM 23k, PGD-5 AT ~10k img/s, experiments/results/bench_gpu_*).
#   Environment: AA_N (default 1000), EXTRA (more --config overrides, e.g. a tiny CPU check:
#   EXTRA="--config.width=4 --config.train_examples=300 --config.eval_num_examples=100"),
#   WHEELS (default .whl: wheels installed first when ml_collections is missing).
# Workdirs go to $TMPDIR; OUTDIR gets each run's results, evaluations and logs (no
# checkpoints), and timings.txt.
set -euo pipefail
out=${1:?usage: gpu_cifar10.sh OUTDIR DATA [EPOCHS]}
data=${2:?usage: gpu_cifar10.sh OUTDIR DATA [EPOCHS]}
epochs=${3:-15}
aa_n=${AA_N:-1000}
py=${PYTHON:-python3}
mkdir -p "$out"
if ! $py -c "import ml_collections" 2>/dev/null; then
  $py -m pip install --no-index --no-deps "${WHEELS:-.whl}"/*.whl
fi
work=$(mktemp -d)
stamp() { echo "$(date -u +%FT%TZ) $*" | tee -a "$out/timings.txt"; }
stamp "start: $($py -c 'import jax; print(jax.__version__, jax.devices())')"
common=(--config.dataset=image_folder "--config.data_dir=$data" --config.half_precision
        "--config.num_epochs=$epochs" --config.log_every_steps=100
        --config.checkpoint_every_steps=100000 --config.keep_checkpoints=1)
read -r -a extra <<< "${EXTRA:-}"
for spec in "sgd sgd" "sam_rho0.1 sam --config.rho=0.1" "at_linf_eps8 at"; do
  read -r -a s <<< "$spec"
  name=${s[0]}
  stamp "train $name"
  mkdir -p "$out/$name"
  $py -m samrobust.main "--config=configs/${s[1]}.py" "--workdir=$work/$name" \
    "${common[@]}" "${s[@]:2}" "${extra[@]}" 2>&1 | tee "$out/$name/train.log"
  stamp "autoattack $name"
  $py -m samrobust.evaluate "--workdir=$work/$name" --suite=autoattack --eps=8/255 \
    --norm=linf "--num_examples=$aa_n" 2>&1 | tee "$out/$name/autoattack.log"
  stamp "done $name"
  cp "$work/$name"/*.json "$work/$name"/*.md "$work/$name"/metrics.jsonl "$out/$name/"
done
stamp "all done"
