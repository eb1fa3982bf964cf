#!/usr/bin/env bash
# One H200 device session in a few back-to-back calls (the machine keeps /tmp between calls while warm).
# Each call runs one phase; what it writes goes to /tmp/res/PHASE and comes back as $OUT/PHASE.tgz
# (plus its log), so the 8-files-per-call limit is never in the way.
#
#   bash bench/h200_session.sh install .whl    # wheels of one call (tokenspeed-fa3 fills a call alone)
#   bash bench/h200_session.sh tests           # nvidia-smi, doctor, the gpu-marked tests (skip allow-list)
#   bash bench/h200_session.sh speed3          # bench/speed3.py (issue 21), bounded
#   bash bench/h200_session.sh tasks           # bench/image_tasks.py (issue 19), bounded
#   bash bench/h200_session.sh extras          # bench/scaled_mm_shapes.py (SHAPES=1), bench/profile_step.py (fp8, fp16), bench/compare_sheet.py
#   bash bench/h200_session.sh serving         # bench/shared_gpu.py, then bench/serving_gpu.py
set -u
phase=${1:?phase}
export PYTHONPATH=$PWD/src:/tmp/site HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
res=/tmp/res/$phase
mkdir -p "$res" /tmp/zimage-cc
out=${OUT:-/tmp/out}
mkdir -p "$out"
log="$out/$phase.log"
started=$(date +%s)
note() { echo "[$(( $(date +%s) - started ))s] $*" | tee -a "$log"; }

case "$phase" in
  install)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${2:?wheel folder}"/*.whl 2>&1 | tail -3 | tee -a "$log"
    python3 -c "import importlib; [print(m, getattr(importlib.import_module(m), '__version__', '?')) for m in ('torch','diffusers','fastapi','pydantic','uvicorn','torchao','cache_dit')]" 2>&1 | tee -a "$log"
    ;;
  tests)
    nvidia-smi > "$res/nvidia-smi.txt" 2>&1
    if [ -z "${MODULES:-}" ]; then  # (a rerun of some modules skips the doctor)
      python3 -m zimage_trt.cli doctor > "$res/doctor.txt" 2>&1; python3 -m zimage_trt.cli doctor --json > "$res/doctor.json" 2>&1
      note "doctor rc=$?"
    fi
    # The modules holding gpu-marked tests, by name (the others import extras this machine may lack).
    modules=${MODULES:-$(grep -l "mark.gpu\|pytestmark.*gpu" tests/test_*.py)}
    timeout "${TESTS_S:-400}" python3 -m pytest -q -m gpu -p no:cacheprovider -rs $modules > "$res/gpu_tests.log" 2>&1
    note "pytest -m gpu rc=$?"
    tail -60 "$res/gpu_tests.log" | tee -a "$log"
    ;;
  speed3)
    timeout $(( ${BUDGET:-450} + 60 )) python3 bench/speed3.py --out "$res" --compile-cache /tmp/zimage-cc --budget-s "${BUDGET:-450}" ${JOBS:+--jobs "$JOBS"} > "$res/stdout.log" 2>&1
    note "speed3 rc=$?"
    tail -50 "$res/stdout.log" | tee -a "$log"
    find "$res" -name '*.png' -size +1M -delete  # (random-weight images: noise, megabytes each)
    ;;
  tasks)
    timeout "${TASKS_S:-400}" python3 bench/image_tasks.py --out "$res" --images 3 --peer-images 2 > "$res/stdout.log" 2>&1
    note "image_tasks rc=$?"
    tail -50 "$res/stdout.log" | tee -a "$log"
    ;;
  serving)
    timeout $(( ${BUDGET:-230} + 30 )) python3 bench/shared_gpu.py "$res/shared_gpu" --budget-s "${BUDGET:-230}" > "$res/shared_gpu.stdout" 2>&1
    note "shared_gpu rc=$?"
    tail -30 "$res/shared_gpu.stdout" | tee -a "$log"
    timeout "${SERVING_S:-200}" python3 bench/serving_gpu.py --out "$res/serving_gpu" --images 8 > "$res/serving_gpu.stdout" 2>&1
    note "serving_gpu rc=$?"
    tail -15 "$res/serving_gpu.stdout" | tee -a "$log"
    ;;
  extras)  # where a step's time goes (the profile behind a missed step target), and the compare sheet for docs/
    if [ -n "${SHAPES:-}" ]; then
      timeout 120 python3 bench/scaled_mm_shapes.py --json "$res/scaled_mm_shapes.json" > "$res/scaled_mm_shapes.txt" 2>&1
      note "scaled_mm_shapes rc=$?"; cat "$res/scaled_mm_shapes.txt" | tee -a "$log"
    fi
    for precision in ${PROFILE_PRECISIONS:-fp8 fp16}; do
      timeout "${PROFILE_S:-150}" python3 bench/profile_step.py --precision "$precision" > "$res/profile_step_$precision.txt" 2>&1
      note "profile_step $precision rc=$?"
      head -45 "$res/profile_step_$precision.txt" | tee -a "$log"
    done
    [ -n "${NO_SHEET:-}" ] || timeout "${SHEET_S:-200}" python3 bench/compare_sheet.py --out "$res/compare" --tile 192 --quiet > "$res/compare.log" 2>&1
    note "compare_sheet rc=$?"
    tail -12 "$res/compare.log" | tee -a "$log"
    ;;
  *) echo "unknown phase $phase" >&2; exit 2 ;;
esac
tar czf "$out/$phase.tgz" --exclude="*.bin" --exclude="*.plan" --exclude="*.safetensors" -C /tmp/res "$phase" 2>/dev/null
note "done; $(du -h "$out/$phase.tgz" | cut -f1) in $phase.tgz"
