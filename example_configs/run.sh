#!/usr/bin/env bash
# The main job, on a fresh machine: install, make the example models (once, ~1 min
# on CPU), merge them with awd through plain mergekit-yaml, and score the result.
set -euo pipefail
. "$(dirname "$0")/../.ci/venv.sh"
python -m mergekit_awd.examples make example_models/tiny-llama > /dev/null
mergekit-yaml example_configs/tiny-awd.yml out/tiny-awd --quiet "$@"
mergekit-yaml example_configs/tiny-task-arithmetic.yml out/tiny-task-arithmetic --quiet "$@"
python -m mergekit_awd.examples eval out/tiny-awd out/tiny-task-arithmetic
echo "AWD-merged model written to $(pwd)/out/tiny-awd"
