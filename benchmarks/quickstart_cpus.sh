#!/usr/bin/env bash
# The quick start's merge, score and tune on the shipped example models, on other
# CPUs, each compared with what the README quotes (docs/quickstart.log):
#  - other CPU kinds, emulated by QEMU's user mode (Debian's qemu-user), the Python
#    process and every library in it running on the emulated CPU:
#      intel-xeon: `qemu-x86_64 -cpu Cascadelake-Server-v5`, an Intel Xeon
#        (GenuineIntel, so MKL and oneDNN take their Intel paths; QEMU has AVX2 but no
#        AVX-512), this venv's torch; in run.sh's reproducible mode, then with AVX2
#        kernels and MKL's automatic (Intel) path;
#      arm64: `qemu-aarch64`, an ARMv8 CPU with SVE, Debian's arm64 Python and arm64
#        wheels (torch's OpenBLAS instead of MKL), made by benchmarks/arm64_root.sh
#        in $ARM64_ROOT (default /work/arm64); skipped where it is missing;
#  - other arithmetics of this CPU: torch's kernel width (ATEN_CPU_CAPABILITY) and
#    the thread count. (MKL's code path cannot be varied on an AMD CPU: MKL runs its
#    generic path there whatever MKL_CBWR asks; each log's first line says the path
#    MKL took, as MKL_VERBOSE names it.)
# Every setting runs in its own folder laid out as the quick start's (out/...), so its
# printed lines are the quick start's; each log is compared with docs/quickstart.log
# (less the lines that name this machine: the path of out/, transformers' notices).
#
#   bash benchmarks/quickstart_cpus.sh [OUT_DIR] [SETTING ...]
#   # ~1 min a native setting, ~6 min an emulated one, on 2 cores
set -uo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
out=$(realpath -m "${1:-out/quickstart-cpus}")
shift || true
only=" $* "
mkdir -p "$out"
.venv/bin/python example_configs/examples.py check example_models/tiny-llama || exit 1
.venv/bin/python example_configs/examples.py data example_models/data > /dev/null
arm=${ARM64_ROOT:-/work/arm64}/root
data=()
for t in reverse sort shift add; do
  data+=(--data "$t=example_models/data/$t.val.jsonl" --test "$t=example_models/data/$t.test.jsonl")
done
# What run.sh prints that a setting prints too: the quoted block less the lines that
# name the machine (transformers' notices, the absolute path) or that run.sh alone
# prints (the check of the models, its own echo lines).
expected=$out/expected.log
grep -v "^#\|torch_dtype\|Loading weights\|^example models:\|^AWD-merged\|^Choosing\|^$" \
  docs/quickstart.log > "$expected"

# Lines that are the emulator's, not the quick start's: QEMU naming the CPU features
# it lacks (AVX-512), and oneDNN on arm64 finding no CPU id in the host's sysfs.
notices="torch_dtype\|Loading weights\|^qemu-x86_64: warning: TCG\|Can't open MIDR_EL1 sysfs entry"

# name, runner, ATEN_CPU_CAPABILITY, MKL_CBWR, threads
settings="this-cpu,native,default,COMPATIBLE,2
intel-xeon,qemu-x86_64 -cpu Cascadelake-Server-v5,default,COMPATIBLE,2
intel-xeon-avx2-mkl-auto,qemu-x86_64 -cpu Cascadelake-Server-v5,avx2,AUTO,2
arm64,qemu-aarch64,default,COMPATIBLE,2
one-thread,native,default,COMPATIBLE,1
avx2-kernels-3-threads,native,avx2,AUTO,3
avx512-kernels-8-threads,native,avx512,AUTO,8"
while IFS=, read -r name runner cap mkl threads; do
  [ "$only" = "  " ] || [[ "$only" == *" $name "* ]] || continue
  case $runner in
    native) py=("$repo/.venv/bin/python")
      cpu=$(awk -F': ' '/^vendor_id/ {v = $2} /^cpu family/ {f = $2} /^model\t/ {m = $2}
        /^flags/ {x = ($2 ~ /avx512f/) ? "AVX-512" : "no AVX-512"}
        END {print v " family " f " model " m ", " x}' /proc/cpuinfo) ;;
    qemu-aarch64)
      if [ ! -x "$arm/usr/bin/python3.11" ]; then
        printf '%-28s skipped: no arm64 Python in %s (bash benchmarks/arm64_root.sh)\n' "$name" "$arm"
        continue
      fi
      py=(qemu-aarch64 -L "$arm" "$arm/usr/bin/python3.11"); cpu="qemu-aarch64 -cpu max" ;;
    *) read -ra py <<< "$runner"; py+=("$repo/.venv/bin/python"); cpu=$runner ;;
  esac
  work=$out/$name
  rm -rf "$work" && mkdir -p "$work"
  ln -s "$repo/example_configs" "$repo/example_models" "$work/"
  log=$out/$name.log
  start=$(date +%s)
  (
    cd "$work"
    export ATEN_CPU_CAPABILITY=$cap MKL_CBWR=$mkl OMP_NUM_THREADS=$threads MKL_NUM_THREADS=$threads
    export PYTHONPATH=$repo HF_HUB_OFFLINE=1
    yaml=("${py[@]}" -m mergekit.scripts.run_yaml)
    tune=("${py[@]}" -c "import sys; from mergekit_awd.cli import main; sys.argv[0] = 'mergekit-awd'; main()")
    # MKL's code path as MKL itself names it (MKL_VERBOSE), for one product: MKL
    # takes its own vendor's vector paths only on an Intel CPU, whatever MKL_CBWR asks
    path=$(MKL_VERBOSE=1 "${py[@]}" -c "import torch; a = torch.ones(64, 64); a @ a" 2>&1 |
      grep -o "for Intel(R) 64 architecture .* processors" | head -1 |
      sed 's/.*Intel(R) Architecture processors/generic/; s/.*(Intel(R) \([A-Z0-9_-]*\)) enabled processors/\1/')
    "${py[@]}" -c "import platform, torch; print('# ${cpu}:', platform.machine(), 'torch', torch.__version__, 'kernels', torch.backends.cpu.get_cpu_capability(), 'MKL', '${path:-none}')" &&
    "${yaml[@]}" example_configs/tiny-awd.yml out/tiny-awd --quiet &&
    "${yaml[@]}" example_configs/tiny-task-arithmetic.yml out/tiny-task-arithmetic --quiet &&
    "${py[@]}" example_configs/examples.py eval out/tiny-awd out/tiny-task-arithmetic &&
    "${tune[@]}" tune example_configs/tiny-awd.yml "${data[@]}" --quiet \
      --methods awd,task_arithmetic,ties --lambda 0.3,0.5,0.7 --keep-delta 0,1 \
      --out out/tiny-tune
  ) 2>&1 | grep -v "$notices" > "$log"
  merged=$(sha256sum "$work/out/tiny-awd/model.safetensors" 2>/dev/null | cut -c1-16)
  if cmp -s "$expected" <(grep -v "^#" "$log"); then verdict="prints the README's block"
  else verdict="PRINTS OTHER LINES than the README: diff $expected $log"; fi
  printf '%-26s %-52s %s threads %5ss  out/tiny-awd sha256 %s  %s\n' "$name" \
    "$(head -1 "$log" | cut -c3-)" "$threads" "$(( $(date +%s) - start ))" "${merged:-none}" "$verdict"
done <<< "$settings"
