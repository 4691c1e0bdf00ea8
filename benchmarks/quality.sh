#!/usr/bin/env bash
# Reruns the quality benchmark of docs/benchmarks.md (needs: pip install ".[bench]").
# Fine-tunes and merges are cached in ~/.cache/awd-quality; delete it to start over.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
python benchmarks/quality/run.py
python benchmarks/quality/plots.py
