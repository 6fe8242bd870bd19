#!/usr/bin/env bash
# Regenerates every report under results/ with the full default grid of each study, on the embedded digits
# (dataset mnist_t10k: 8000/2000 cut from the official MNIST test images, NOT the official split).
#
#   bash results/regenerate.sh [--force] [STUDY ...]      # default: every study
#
# Resumable: re-running it continues where it stopped. Phase 1 runs `bnstudy-study STUDY` for each study: its
# grid, then every arm extended past an unexplained edge and the seeds of each sequential look, until nothing is
# pending (the training app skips every run whose folder already holds a finished result of the same config);
# its own report goes to $RUNS_ROOT/reports/<study>, outside the tracked tree. benchmarks/cost_study.py skips a
# finished cost grid. Phase 2 writes each study's report into results/<study>/ (replaced as a whole) and then
# the verdict table atop results/README.md (bnstudy-report --index). Reports land in results/ only after all
# training, so that writing them cannot make later runs' git SHA `-dirty`.
#
# Refuses to start on a checkout with uncommitted changes to tracked files (each run records the git SHA
# it was trained with; a report of `-dirty` runs cannot be traced to code), unless --force is given.
# Run folders go to $RUNS_ROOT (default outputs/results). Prints the wall time of each study's training.
set -euo pipefail
cd "$(dirname "$0")/.."

all_studies=(placement learning_rate init_scale dropout batch_size small_batch_norms smoothness ics dead_units
             convergence regularization cost)
force=0
studies=()
for arg in "$@"; do
  case $arg in
    --force) force=1 ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    -*) echo "regenerate.sh: unknown option $arg (known: --force)" >&2; exit 2 ;;
    *) studies+=("$arg") ;;
  esac
done
[ ${#studies[@]} -gt 0 ] || studies=("${all_studies[@]}")
for study in "${studies[@]}"; do
  [ -f "experiments/$study.yaml" ] || { echo "regenerate.sh: unknown study $study (known: ${all_studies[*]})" >&2; exit 2; }
done

sha=$(python -c "from bnstudy.app.provenance import git_sha; print(git_sha())")
if [[ $sha == *-dirty || $sha == None ]]; then
  if [ $force -eq 0 ]; then
    echo "regenerate.sh: the checkout has uncommitted changes (git SHA $sha); commit them first, or pass --force" \
         "(the runs then record a -dirty SHA)." >&2
    exit 2
  fi
  echo "regenerate.sh: warning: running on a dirty checkout ($sha), as --force asks" >&2
fi
runs_root=${RUNS_ROOT:-outputs/results}
echo "regenerate.sh: git SHA $sha; runs in $runs_root; $(nproc) CPUs, load $(cut -d' ' -f1 /proc/loadavg)"

for study in "${studies[@]}"; do
  start=$(date +%s)
  if [ "$study" = cost ]; then  # interleaved timing rounds in one process (see experiments/cost.yaml)
    python benchmarks/cost_study.py --out-dir "$runs_root"
  else
    python -m bnstudy.study "$study" --out "$runs_root/reports/$study" "out_dir=$runs_root" logger.wandb.mode=disabled logger.progress=false
  fi
  echo "== $study: trained in $(( $(date +%s) - start )) s"
done

for study in "${studies[@]}"; do
  rm -rf "results/$study"
  python -m bnstudy.report "$study" --out-dir "$runs_root" --out "results/$study"
done
python -m bnstudy.report --index results
