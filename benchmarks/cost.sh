#!/usr/bin/env bash
# Reruns the cost benchmark of docs/benchmarks.md from scratch (synthetic models
# are cached in $TMPDIR/awd-bench): awd vs task_arithmetic and ties, three sizes,
# K = 4 and 8, then the solver alone. Hours on 2 cores at 400M with K = 8.
# (The solver on MiniLM task vectors, benchmarks/solver_minilm.py, was retired with
# the MiniLM harness: its code is in commit 3d2c1e7.)
set -euo pipefail
cd "$(dirname "$0")/.."
for size in 25m 100m; do
  for k in 4 8; do
    python benchmarks/merge_cost.py --size "$size" --k "$k" --rounds 5 --ties --skip-solver
  done
done
for k in 4 8; do
  python benchmarks/merge_cost.py --size 400m --k "$k" --shard 500MB --rounds 2 --ties --skip-solver
done
python benchmarks/merge_cost.py --size 100m --k 4 --skip-merge --naive-steps 5
