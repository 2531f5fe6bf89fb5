#!/usr/bin/env bash
# Issue 9's GPU check, prepared once: on one CUDA device, in under 8 minutes,
#   1. the GPU tests (pytest -m gpu: the compiled kernels bit-exact against the references),
#   2. scripts/bench_kernels.py at 16M and 64M elements: each kernel's time, its fraction of the
#      measured device copy bandwidth and its speed-up over the eager reference,
#   3. scripts/bench_step.py: step-time ratio of luq4, mvue24, mvue24_luq4 and fwd int4 against fp32
#      (bf16 autocast) for ResNet-50 at batch 128 on synthetic 224x224 data and for the char-level GPT
#      at a GPU-sized width (6 layers, 384 wide, batch 64 x 256 tokens),
# and writes results/bench_gpu.md (each part's command, exit status and output).
#
#   scripts/gpu_check.sh              # on a machine with a CUDA device
#   scripts/gpu_check.sh --dry-run    # anywhere: the same three parts on the CPU at toy sizes, to
#                                     # check the script itself (device calls replaced, nothing timed)
# Targets (issue 9): >= 80% of copy bandwidth at >= 16M elements, >= 5x the eager reference,
# ResNet-50 luq4 step <= 1.15x fp32.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
OUT=results/bench_gpu.md
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUT="$2"; shift ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "error: unknown argument $1 (use --dry-run, --out FILE)" >&2; exit 2 ;;
  esac
  shift
done
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

if [ "$DRY" = 0 ]; then
  if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 3)"; then
    echo "error: no CUDA device visible (run with --dry-run to check the script on a CPU)" >&2
    exit 3
  fi
  export TRITON_INTERPRET=0
  TESTS=("$PY" -m pytest -m gpu -q -p no:cacheprovider tests/test_kernels.py)
  KERNELS=("$PY" scripts/bench_kernels.py --sizes 16777216,67108864 --repeat 20 --no-train --no-compile)
  STEPS=("$PY" scripts/bench_step.py --device cuda --workloads resnet50,chargpt_gpu
         --recipes luq4,mvue24,mvue24_luq4,fwd:int4 --steps 10 --no-estimators)
  LIMITS=(120 150 180)  # 7.5 min at most, inside the 8-minute budget
  DEVICE="$("$PY" -c "import torch; print(torch.cuda.get_device_name())")"
else
  export TRITON_INTERPRET=1
  TESTS=("$PY" -m pytest -m gpu -q -p no:cacheprovider --collect-only tests/test_kernels.py)
  KERNELS=("$PY" scripts/bench_kernels.py --quick --sizes 65536 --repeat 1 --no-train --no-compile
           --estimators luq4,mvue24)
  STEPS=("$PY" scripts/bench_step.py --device cpu --quick --workloads resnet50,chargpt_gpu
         --recipes luq4,mvue24,mvue24_luq4,fwd:int4 --no-estimators)
  LIMITS=(120 120 240)
  DEVICE="none (dry run on the CPU: toy sizes, the device calls replaced)"
fi

{
  echo "# GPU check (issue 9)"
  echo
  echo "- date: $(date '+%Y-%m-%d %H:%M'); device: $DEVICE; torch $("$PY" -c 'import torch; print(torch.__version__)')"
  echo "- command: \`scripts/gpu_check.sh$([ "$DRY" = 1 ] && echo ' --dry-run')\`"
  echo
} > "$TMP/report.md"

status=0
part() {  # part NAME LIMIT CMD...: run with a time limit, append command, status and output to the report
  local name="$1" limit="$2"; shift 2
  echo "== $name: $*"
  local t0=$SECONDS rc=0
  timeout "$limit" "$@" > "$TMP/part.log" 2>&1 || rc=$?
  tail -n 60 "$TMP/part.log"
  { echo "## $name"; echo; echo "\`$*\` -> exit $rc in $((SECONDS - t0)) s"; echo; echo '```'
    grep -v "Warning" "$TMP/part.log" | tail -n 80; echo '```'; echo; } >> "$TMP/report.md"
  [ "$rc" = 0 ] || status=1
}

part "GPU tests" "${LIMITS[0]}" "${TESTS[@]}"
part "Kernels vs copy bandwidth and eager reference" "${LIMITS[1]}" "${KERNELS[@]}"
part "Training step ratios" "${LIMITS[2]}" "${STEPS[@]}"

mkdir -p "$(dirname "$OUT")"
cp "$TMP/report.md" "$OUT"
echo "wrote $OUT (exit $status)"
exit "$status"
