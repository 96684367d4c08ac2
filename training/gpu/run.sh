#!/usr/bin/env bash
# The prepared GPU job (issue #12 point 5); see training/gpu/README.md.
#   device:     bash training/gpu/run.sh                      ($OUT set by the device tool; carry runs/gpu-carry)
#   CPU smoke:  CRYSTAL_GPU_SMOKE=1 OUT=/tmp/gpu-out CRYSTAL_GPU_WORK=/tmp/gpu-work \
#               CRYSTAL_GPU_PYTHON=.venv/bin/python bash training/gpu/run.sh
# Offline hub, the carried cp312 wheels installed where the interpreter lacks pymatgen, the repository put on
# PYTHONPATH (no pip install of it: nothing to build, nothing to fetch), then training/gpu/job.py. Everything
# printed goes to $OUT/job.log too. Exit status: job.py's (0 ok, 1 failed, 3 stopped at the deadline).
set -euo pipefail
export CRYSTAL_GPU_T0=${CRYSTAL_GPU_T0:-$(date +%s.%N)}
cd "$(dirname "$0")/../.."
: "${OUT:?set OUT to the directory the results go to}"
mkdir -p "$OUT"

main() {
    set -euo pipefail  # a pipeline's subshell: errexit again, whatever the caller had
    export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
    export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-true}  # one process, no fork: tokenise on every core
    export MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=100000000000
    local py=${CRYSTAL_GPU_PYTHON:-python3}
    local carry=${CRYSTAL_GPU_CARRY:-runs/gpu-carry}
    echo "[run.sh] $(date -u +%FT%TZ) host $(hostname) python $($py -c 'import sys; print(sys.version.split()[0], sys.executable)')"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    if $py -c 'import pymatgen.core' 2>/dev/null; then
        echo "[run.sh] pymatgen importable: carried wheels not needed"
    else
        local site=${CRYSTAL_GPU_SITE:-/tmp/crystal-gpu-site}
        ls "$carry"/wheels/*.whl >/dev/null || { echo "[run.sh] no wheels in $carry/wheels (run training/gpu/prepare.sh and carry $carry)"; return 1; }
        local t=$SECONDS
        $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$carry"/wheels/*.whl
        export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
        echo "[run.sh] installed $(ls "$carry"/wheels | wc -l) wheels into $site in $((SECONDS - t)) s"
    fi
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    $py training/gpu/job.py
}

set +e
main 2>&1 | tee -a "$OUT/job.log"
status=${PIPESTATUS[0]}
set -e
if [ "$status" -ne 0 ]; then
    echo "!!!!! training/gpu/run.sh FAILED with exit status $status: see $OUT/job.log and $OUT/job.json" | tee -a "$OUT/job.log" >&2
fi
exit "$status"
