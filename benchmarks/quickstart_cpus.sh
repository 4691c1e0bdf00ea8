#!/usr/bin/env bash
# The quick start's merge, score and tune on the shipped example models under the
# arithmetic of other CPUs, simulated on this one: torch's kernel width
# (ATEN_CPU_CAPABILITY default / avx2 / avx512), MKL's code path (MKL_CBWR
# COMPATIBLE / AVX2 / AUTO, i.e. what another vendor's CPU would run) and the thread
# count (a machine with another core count splits its sums differently). Prints, per
# setting, whether the quick start's printed output is the same bytes as the first
# setting's (the reproducible mode that run.sh sets) and the merged weights' digest,
# and keeps every log.
#
#   bash benchmarks/quickstart_cpus.sh [OUT_DIR]     # ~2 min a setting on 2 cores
set -uo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
out=${1:-out/quickstart-cpus}
mkdir -p "$out"
python example_configs/examples.py check example_models/tiny-llama || exit 1
python example_configs/examples.py data example_models/data > /dev/null
data=()
for t in reverse sort shift add; do
  data+=(--data "$t=example_models/data/$t.val.jsonl" --test "$t=example_models/data/$t.test.jsonl")
done
# name capability mkl threads
settings="reproducible,default,COMPATIBLE,2
one-thread,default,COMPATIBLE,1
avx2-mkl-avx2-3-threads,avx2,AVX2,3
avx512-mkl-auto-8-threads,avx512,AUTO,8
avx512-mkl-sse42-2-threads,avx512,SSE4_2,2"
first=""
while IFS=, read -r name cap mkl threads; do
  log="$out/$name.log"
  work="$out/run"  # one folder for every setting: the logs name the same paths
  rm -rf "$work"
  start=$(date +%s)
  (
    export ATEN_CPU_CAPABILITY=$cap MKL_CBWR=$mkl OMP_NUM_THREADS=$threads MKL_NUM_THREADS=$threads
    mergekit-yaml example_configs/tiny-awd.yml "$work/tiny-awd" --quiet &&
    mergekit-yaml example_configs/tiny-task-arithmetic.yml "$work/tiny-task-arithmetic" --quiet &&
    python example_configs/examples.py eval "$work/tiny-awd" "$work/tiny-task-arithmetic" &&
    mergekit-awd tune example_configs/tiny-awd.yml "${data[@]}" --quiet \
      --methods awd,task_arithmetic,ties --lambda 0.3,0.5,0.7 --keep-delta 0,1 \
      --out "$work/tiny-tune"
  ) 2>&1 | grep -v "torch_dtype\|Loading weights" | sed "s#$work/##g" > "$log"
  merged=$(sha256sum "$work/tiny-awd/model.safetensors" | cut -c1-16)
  if [ -z "$first" ]; then first=$log; verdict="reference"
  elif cmp -s "$first" "$log"; then verdict="prints the same bytes as $(basename "$first" .log)"
  else verdict="PRINTS OTHER NUMBERS than $(basename "$first" .log): diff $first $log"; fi
  printf '%-28s %s threads  %4ss  out/tiny-awd sha256 %s  %s\n' "$name" "$threads" \
    "$(( $(date +%s) - start ))" "$merged" "$verdict"
done <<< "$settings"
