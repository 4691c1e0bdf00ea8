# Sourced by .ci/run and example_configs/run.sh: a project venv with torch's local
# CPU wheel installed first (a bare `torch` requirement would pull a multi-GB CUDA
# build), then this project (with the extras given in $AWD_EXTRAS).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
quiet_pip() {  # pip's own output, less this machine's notes on missing local indexes
  python -m pip install -q "$@" 2>&1 | { grep -v "^WARNING: Location .* is ignored" || true; }
}
quiet_pip torch==2.13.0
quiet_pip ".${AWD_EXTRAS:-}"
export HF_HUB_OFFLINE=1
