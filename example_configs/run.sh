#!/usr/bin/env bash
# The main job, on a fresh machine: install, check the shipped example models (a tiny
# Llama and four fine-tunes; `examples.py rebuild DIR` retrains them), merge them with
# awd through plain mergekit-yaml, score the result, then let `mergekit-awd tune`
# choose the settings on held-out data.
set -euo pipefail
# One summation order whatever the CPU's vendor and vector width (set before torch
# starts): MKL's reproducible mode and torch's portable kernels.
export MKL_CBWR=COMPATIBLE ATEN_CPU_CAPABILITY=default
. "$(dirname "$0")/../.ci/venv.sh"
python example_configs/examples.py check example_models/tiny-llama
python example_configs/examples.py data example_models/data > /dev/null
mergekit-yaml example_configs/tiny-awd.yml out/tiny-awd --quiet "$@"
mergekit-yaml example_configs/tiny-task-arithmetic.yml out/tiny-task-arithmetic --quiet "$@"
python example_configs/examples.py eval out/tiny-awd out/tiny-task-arithmetic
echo "AWD-merged model written to $(pwd)/out/tiny-awd"
echo
echo "Choosing lambda, keep_delta and the method on held-out data (mergekit-awd tune):"
data=()
for t in reverse sort shift add; do
  data+=(--data "$t=example_models/data/$t.val.jsonl" --test "$t=example_models/data/$t.test.jsonl")
done
mergekit-awd tune example_configs/tiny-awd.yml "${data[@]}" --quiet \
  --methods awd,task_arithmetic,ties --lambda 0.3,0.5,0.7 --keep-delta 0,1 \
  --out out/tiny-tune "$@"
