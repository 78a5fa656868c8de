#!/usr/bin/env bash
# The end-of-session GPU check, in one device call (see DEVELOPERS.md / the device tool):
#   source .device/env.sh && bash perf/gpu_check.sh "$OUT"
# GPU tests, compute-sanitizer (memcheck, racecheck) on one launch of each gather engine, and
# one Wan 2.1 1.3B step at 480p. Each step has its own time limit; logs go to $1. The script
# exits non-zero when any step fails or runs out of time (each step still runs).
set -o pipefail
out=${1:-/tmp/fgattn-gpu-check}
mkdir -p "$out"
export FGATTN_CACHE_DIR=/tmp/fgattn-cache PYTHONUNBUFFERED=1
kernel_subset=${KERNEL_SUBSET:-"not test_against_reference or 128-bfloat16-128-cpasync-128-2 \
or 64-float16-64-tma-128-3 or 128-float16-64-hybrid-128-2"}
failed=()
timeout "${T_TESTS:-150}" python3 -m pytest -m gpu -q -p no:cacheprovider tests \
    -k "$kernel_subset" 2>&1 | grep -v Warning | tail -40 | tee "$out/gpu_tests.txt" \
    || failed+=(gpu_tests)
python3 perf/sanitize.py > /dev/null 2>&1  # compile into the disk cache first
for tool in memcheck racecheck; do
    # --error-exitcode: a reported error fails the step (by default the tool exits 0)
    timeout "${T_SAN:-60}" compute-sanitizer --tool "$tool" --error-exitcode 3 \
        python3 perf/sanitize.py 2>&1 | grep -v Warning | tail -6 | tee "$out/$tool.txt" \
        || failed+=("$tool")
done
timeout "${T_E2E:-100}" python3 perf/e2e_wan.py --sizes 480p --reps 3 --warmup 1 \
    --out "$out" 2>&1 | grep -v Warning | tail -25 | tee "$out/e2e.txt" || failed+=(e2e)
if [ ${#failed[@]} -gt 0 ]; then
    echo "gpu_check: failed: ${failed[*]}" >&2
    exit 1
fi
