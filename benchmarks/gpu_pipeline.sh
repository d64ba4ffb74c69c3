#!/usr/bin/env bash
# The whole pipeline on a machine with a CUDA GPU (benchmarks/gpu_check.py times the training loop
# alone): (1) the tests whose training and distillation then run on the GPU, (2) the `small`
# preset's stages one by one, each timed (train-vae, cache and train on the GPU), (3) a second
# recipe trained on the same data, VAE and cache, both evaluated, side by side in one run.
#   benchmarks/gpu_pipeline.sh OUTDIR [KEY=VALUE ...]   (the settings of the second recipe)
# Needs blossom importable (installed, or PYTHONPATH=src) and a CUDA build of torch. TESTS=0 skips
# (1); PRESET and GLOBAL_SETS="k=v ..." change what both recipes run (tests/test_benchmarks.py
# runs it on a CPU with the micro settings).
set -uo pipefail
out=${1:?usage: benchmarks/gpu_pipeline.sh OUTDIR [KEY=VALUE ...]}
shift
py=${PYTHON:-python3}
work=${WORK:-/tmp/blossom-gpu}
preset=${PRESET:-small}
common=()  # GLOBAL_SETS="k=v ...": settings for both recipes (a quick trial of this script on a CPU)
for kv in ${GLOBAL_SETS:-}; do common+=(--set "$kv"); done
mkdir -p "$out" "$work"
summary="$out/summary.txt"
say() { echo "$*" | tee -a "$summary"; }

say "$(nvidia-smi -L 2>&1 | head -1)"
say "$($py -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")')"
say "$(nproc) CPU cores"

# (1) the unit tests: where CUDA is present the training loop and distillation pick it
if [ "${TESTS:-1}" != 0 ]; then
  start=$(date +%s)
  timeout "${TEST_TIMEOUT:-180}" $py -m pytest -q -p no:cacheprovider tests/test_train.py tests/test_distill.py \
    -k "not registers and not app" >"$work/pytest.log" 2>&1
  say "pytest rc=$? in $(($(date +%s) - start)) s: $(tail -1 "$work/pytest.log")"
  grep -E "^(FAILED|ERROR)|Error" "$work/pytest.log" | head -20 | tee -a "$summary"
fi

# (2) the preset (small), stage by stage
stage() { # ROOT STAGE [--set ...]: one blossom stage, its seconds and exit status in the summary
  local root=$1 name=$2
  shift 2
  local t0
  t0=$(date +%s%N)
  $py -m blossom --preset "$preset" --set tracking.live=false --set "outputs=$root" "${common[@]}" "$@" "$name" \
    >"$work/$(basename "$root")-$name.log" 2>&1
  local rc=$?
  say "$(basename "$root") $name rc=$rc $(((($(date +%s%N) - t0) / 1000000))) ms: $(grep -v '%|' "$work/$(basename "$root")-$name.log" | tail -1)"
  return $rc
}
a=$work/a
b=$work/b
stage "$a" data && stage "$a" train-vae && stage "$a" cache && stage "$a" classifier && stage "$a" train || exit 1
cp "$a/train/model/train.json" "$out/a-train.json" 2>/dev/null

# (3) the second recipe on the same data, VAE, cache and classifier
mkdir -p "$b"
for d in data vae cache classifier; do ln -sfn "$a/$d" "$b/$d"; done
sets=()
for kv in "$@"; do sets+=(--set "$kv"); done
say "recipe b: $*"
stage "$b" train "${sets[@]}"
cp "$b/train/model/train.json" "$out/b-train.json" 2>/dev/null

# both evaluations at once, each on half the cores (sampling runs on the CPU); one after the
# other where there is a single core
half=$(($(nproc) / 2))
if [ "$half" -ge 1 ]; then
  taskset -c 0-$((half - 1)) bash -c "$(declare -f stage say); $(declare -p py work summary preset common); stage $a evaluate" &
  taskset -c "$half-$(($(nproc) - 1))" bash -c "$(declare -f stage say); $(declare -p py work summary preset common); stage $b evaluate ${sets[*]}" &
  wait
else
  stage "$a" evaluate
  stage "$b" evaluate "${sets[@]}"
fi
for r in a b; do cp "$work/$r/eval/metrics.json" "$out/$r-metrics.json" && cp "$work/$r/eval/samples.png" "$out/$r-samples.png"; done
(cd "$work" && tar -czf "$out/logs.tar.gz" ./*.log)
say "done"
