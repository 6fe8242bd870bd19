#!/usr/bin/env bash
# Regenerates every report committed under results/ from scratch: trains each study's grid on the
# given MNIST TFDS directory, then writes results/<study>/ with bnstudy.report.
#
#   bash results/regenerate.sh DATA_DIR [STUDY ...]
#
# The committed reports were made on an offline MNIST built from the 10,000 official MNIST *test*
# images (8000 train / 2000 test): real handwriting, not the official split, so not official MNIST
# results. On a 2-core CPU the full default grids take hours; the settings below say, per study,
# which variant was run (also printed in each report).
set -euo pipefail
cd "$(dirname "$0")/.."
data_dir=${1:?usage: bash results/regenerate.sh DATA_DIR [STUDY ...]}
shift
studies=("$@")
[ ${#studies[@]} -gt 0 ] || studies=(placement smoothness batch_size learning_rate init_scale dropout cost)
runs_root=${RUNS_ROOT:-outputs/results}
note="Data: an 8000/2000 train/test split cut from the 10,000 official MNIST test images (real handwriting, NOT the official MNIST split; not official MNIST results)."

# Per-study overrides of the default grid, chosen to fit a 2-core CPU; empty = the default grid as written.
declare -A variant=(
  [placement]=""
  [smoothness]="train.epochs=1"
  [batch_size]="train.epochs=1"
  [learning_rate]="train.epochs=1"
  [init_scale]="train.epochs=1"
  [dropout]="train.epochs=1"
  [cost]=""
)

for study in "${studies[@]}"; do
  overrides=${variant[$study]-}
  label="default grid${overrides:+, with ${overrides}}"
  echo "== $study ($label)"
  # shellcheck disable=SC2086
  python -m bnstudy.train -m "experiment=$study" "dataset.data_dir=$data_dir" "out_dir=$runs_root" \
    logger.wandb.mode=disabled logger.progress=false $overrides "+report.variant='$label'"
  python -m bnstudy.report "$study" --out-dir "$runs_root" --out "results/$study" --data-note "$note"
done
