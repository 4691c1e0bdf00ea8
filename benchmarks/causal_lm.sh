#!/usr/bin/env bash
# Reruns the causal-LM quality benchmark of docs/benchmarks.md end to end:
# pretrain, instruct stage, 3 x 8 fine-tunes twice, every merge, tables and plot
# (needs: pip install ".[bench]"). Checkpoints and scores are cached in
# ~/.cache/awd-causal-lm (delete it to start over); about 90 min on 2 CPU cores alone.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
python benchmarks/causal_lm/run.py "$@"
python benchmarks/causal_lm/tables.py
