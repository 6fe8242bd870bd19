#!/usr/bin/env bash
# Regenerates the reports under results/, one study at a time, each landing in results/<study>/ the moment it is
# decided, with its raw runs beside it (runs.jsonl.gz), on the embedded digits (dataset mnist_t10k: 8000/2000 cut
# from the official MNIST test images, NOT the official split).
#
#   bash results/regenerate.sh [--force] [--commit] [--keep-going] [--network NAME] [--set OVERRIDE]... [STUDY]...
#
# With no STUDY, every study.
# --keep-going goes on to the next study when one fails (the exit status is then 1, naming the failed ones); a
# signal (Ctrl-C, SIGTERM) always stops the whole regeneration. --network NAME replicates the studies on a deep
# network (configs/network/NAME.yaml, e.g. cnn6): each lands in results/NAME/STUDY/, and the index shows its
# verdict beside the 2-conv CNN's. --set OVERRIDE (repeatable) passes a Hydra override to every study named, e.g.
# a grid cut to fit a budget (`--set 'model.init_scale=[0.1,1.0,10.0]'`); the report's command line and the commit
# message record it, and a resumed study must be given the same overrides (or it trains the settings cut).
#
# Per study: `bnstudy-study STUDY --out results/STUDY` restores the runs kept in results/STUDY/runs.jsonl.gz as run
# folders (a fresh clone continues an unfinished regeneration, and no finished run is trained again), trains the
# study until decided (its selection phase, the extensions past an edge, the seeds of each sequential look), and
# writes its report and raw runs into results/STUDY/; then the verdict table atop results/README.md is rebuilt
# from the studies present. With --commit, each landed study is committed at once (results/STUDY and the
# index), so that a session that ends mid-way keeps every study it finished. `cost` runs through
# benchmarks/cost_study.py (interleaved timing rounds in one process).
#
# Refuses to start when what decides the numbers (bnstudy/, configs/, experiments/) has uncommitted changes,
# unless --force: each run records the code fingerprint of those files (code_fingerprint in summary.json), and a
# report refuses runs of several fingerprints. Committing results/ does not change the fingerprint.
# Run folders go to $RUNS_ROOT (default outputs/results). Prints each study's training time.
set -euo pipefail
cd "$(dirname "$0")/.."

all_studies=(placement learning_rate init_scale dropout batch_size small_batch_norms smoothness ics dead_units
             convergence regularization cost)
force=0
commit=0
keep_going=0
network=""
overrides=()
studies=()
while [ $# -gt 0 ]; do
  case $1 in
    --force) force=1 ;;
    --commit) commit=1 ;;
    --keep-going) keep_going=1 ;;
    --network) network=${2:-}; shift ;;
    --set)
      [[ ${2:-} == *=* ]] || { echo "regenerate.sh: --set expects a Hydra override KEY=VALUE, got '${2:-}'" >&2; exit 2; }
      overrides+=("$2"); shift ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    -*) echo "regenerate.sh: unknown option $1 (known: --force, --commit, --keep-going, --network NAME, --set OVERRIDE)" >&2
        exit 2 ;;
    *) studies+=("$1") ;;
  esac
  shift
done
[ ${#studies[@]} -gt 0 ] || studies=("${all_studies[@]}")
for study in "${studies[@]}"; do
  [ -f "experiments/$study.yaml" ] || { echo "regenerate.sh: unknown study $study (known: ${all_studies[*]})" >&2; exit 2; }
done
if [ -n "$network" ]; then
  known=$(cd configs/network && ls *.yaml | sed 's/\.yaml$//' | tr '\n' ' ')
  [ -f "configs/network/$network.yaml" ] || { echo "regenerate.sh: unknown network '$network' (known: $known)" >&2; exit 2; }
  for study in "${studies[@]}"; do
    [ "$study" != cost ] || { echo "regenerate.sh: the cost study times the 2-conv CNN only; leave it out of --network" >&2; exit 2; }
  done
fi
if [ ${#overrides[@]} -gt 0 ]; then
  for study in "${studies[@]}"; do
    [ "$study" != cost ] || { echo "regenerate.sh: the cost study is a benchmark and takes no --set; leave it out" >&2; exit 2; }
  done
fi

changed=$(git status --porcelain --untracked-files=no -- bnstudy configs experiments 2>/dev/null || true)
if [ -n "$changed" ]; then
  if [ $force -eq 0 ]; then
    echo "regenerate.sh: what decides the numbers has uncommitted changes (bnstudy/, configs/, experiments/):" >&2
    echo "$changed" >&2
    echo "commit them first, or pass --force." >&2
    exit 2
  fi
  echo "regenerate.sh: warning: uncommitted changes to bnstudy/, configs/ or experiments/, as --force asks" >&2
fi
fingerprint=$(python -c "from bnstudy.app.provenance import code_fingerprint; print(code_fingerprint())")
runs_root=${RUNS_ROOT:-outputs/results}${network:+/$network}
network_override=(${network:++network=$network})
echo "regenerate.sh: code fingerprint $fingerprint; runs in $runs_root; $(nproc) CPUs, load $(cut -d' ' -f1 /proc/loadavg)"

train_and_report() {  # one study: trained until decided, its report and raw runs in $1
  local study=$1 out=$2
  if [ "$study" = cost ]; then
    python benchmarks/cost_study.py --out-dir "$runs_root" &&
      python -m bnstudy.report cost --out-dir "$runs_root" --out results/cost --no-wandb
  else
    python -m bnstudy.study "$study" "${network_override[@]}" --out "$out" "out_dir=$runs_root" \
      logger.wandb.mode=disabled logger.progress=false "${overrides[@]}"
  fi
}

failed=()
for study in "${studies[@]}"; do
  start=$(date +%s)
  out=results/${network:+$network/}$study
  # A report from before raw runs were kept cannot be resumed or rewritten: it is replaced as a whole. A folder
  # with no report yet (an interrupted first session's training_time.json) is kept: its time adds up.
  if [ ! -f "$out/runs.jsonl.gz" ] && [ -f "$out/verdict.json" ]; then rm -rf "$out"; fi
  status=0
  train_and_report "$study" "$out" || status=$?
  if [ $status -ne 0 ]; then
    [ $status -lt 128 ] && [ $keep_going -eq 1 ] || exit $status  # a signal (128 + its number) stops it all
    echo "== $study: FAILED (exit $status) after $(( $(date +%s) - start )) s; going on" >&2
    failed+=("$study")
    continue
  fi
  python -m bnstudy.report --index results
  echo "== $study: landed in $out after $(( $(date +%s) - start )) s"
  if [ $commit -eq 1 ]; then
    git add "$out" results/README.md
    git commit -q -m "results: $study${network:+ on $network}${overrides:+ (${overrides[*]})} on the embedded digits (code fingerprint $fingerprint)" -- \
      "$out" results/README.md
    echo "== $study: committed"
  fi
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "regenerate.sh: ${#failed[@]} study(ies) failed: ${failed[*]}" >&2
  exit 1
fi
