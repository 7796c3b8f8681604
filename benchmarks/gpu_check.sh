#!/usr/bin/env bash
# The GPU check: petals on the device machine's CUDA image (one H200, Python 3.12, torch 2.11, transformers 5.17),
# as one prepared script. There, in about 4 to 5 minutes (gpu_check.py keeps to a 330 s budget after the install,
# skipping the float32 stage when short of time), it
#   - installs the carried wheels the image lacks (hivemind and what it needs; no network) and petals itself
#     into /tmp/petals-site (the image's own environment is left alone), and prints the versions;
#   - makes a Llama-3-8B-shaped random bfloat16 model with `python -m petals_cli.testing make-model`: full width
#     (hidden 4096, 32 heads, 8 kv heads, intermediate 14336, vocab 128256), 16 of the 32 layers: make-model
#     draws the weights on one CPU core, 20-35 s per billion parameters measured here, so all 32 (8.0 B) would
#     take 3-5 minutes and 16 (4.5 B, 9 GB) 1.5-2.5 (--layers 32 for all; a warm rerun reuses the model);
#   - serves it on two `petals serve` processes on the GPU (blocks 0:8 and 8:16, 127.0.0.1), compares greedy
#     tokens and logits through the swarm with local transformers on the GPU, in bfloat16 and then in float32;
#   - prints `petals bench` (inference) next to local eager decode with transformers' generate().
# Results: $OUT/summary.json, $OUT/gpu_check.log, $OUT/servers-<dtype>-<n>.log; the output ends with a summary.
# Exit status: 0 passed; 1 tokens differ or a stage failed; 2 set-up failed; 3 passed, but with the client's
# local modules on the CPU only (on the GPU they failed: see the summary).
#
# From a work session whose task has a device machine (the `status` tool: can_start_another is true):
#   1. here, once, with the network (about 20 MiB of wheels into .whl/, which git ignores):
#          bash benchmarks/gpu_check.sh --prepare
#   2. then call the `run` tool with
#          command:   bash benchmarks/gpu_check.sh
#          carry:     [".whl"]
#          timeout_s: 420
#      About 6 to 7 minutes of device time with the machine's start: a rerun still fits in the 15. Call
#      `give_back` afterwards unless you rerun at once. The reply's output_tail ends with the summary; the files
#      come back under files_at. Options after the script name go to gpu_check.py (--help there), e.g.
#      `--client-devices cpu` skips trying the client's local modules on the GPU.
# Here, without a GPU, the same flow as a dry run (the checkout's .venv has everything; no wheels needed):
#          bash benchmarks/gpu_check.sh --device cpu --small
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ ${1:-} == --prepare ]]; then
    exec "$ROOT/.venv/bin/python" "$ROOT/benchmarks/gpu_wheels.py" prepare --dest "$ROOT/.whl"
fi
PY=${PYTHON:-}
if [[ -z $PY ]]; then
    if [[ -x $ROOT/.venv/bin/python ]]; then PY=$ROOT/.venv/bin/python; else PY=python3; fi
fi
OUT=${OUT:-/tmp/petals-gpu-check}
SITE=${PETALS_GPU_CHECK_SITE:-/tmp/petals-site}
export OUT HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export PIP_DISABLE_PIP_VERSION_CHECK=1
mkdir -p "$OUT"
# Not the repository root: there `python -m petals_cli.commands` would find the source tree's petals_cli, which
# has no `commands` inside (setuptools maps it in at install time), before the installed one.
cd "${TMPDIR:-/tmp}" || exit 2

LEFT=()
collect() {  # appends every process below $1 to LEFT, each after its own descendants (no `ps` needed)
    local stat line pid
    local -a fields
    for stat in /proc/[0-9]*/stat; do
        read -r line 2>/dev/null <"$stat" || continue
        fields=(${line##*") "})  # after "pid (comm) ": the name may hold spaces; then state, ppid, ...
        [[ ${fields[1]:-} == "$1" ]] || continue
        pid=${stat#/proc/}
        pid=${pid%/stat}
        collect "$pid"
        LEFT+=("$pid")
    done
}

cleanup() {  # the Python side stops its servers; this catches whatever an interrupted run left behind
    LEFT=()
    collect "$BASHPID"
    ((${#LEFT[@]})) || return 0
    echo "stopping leftover processes: ${LEFT[*]}"
    kill -TERM "${LEFT[@]}" 2>/dev/null
    sleep 2
    kill -KILL "${LEFT[@]}" 2>/dev/null
    return 0
}

main() {
    trap cleanup EXIT
    trap 'exit 130' INT TERM
    echo "== petals GPU check: $(date -u +%FT%TZ), $(uname -m), $(nproc) CPUs, python: $PY =="
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv,noheader
    fi
    "$PY" --version
    if "$PY" -c "import hivemind, petals_cli.commands" 2>/dev/null; then
        echo "hivemind and petals import already: nothing to install"
    else
        if ! compgen -G "$ROOT/.whl/*.whl" >/dev/null; then
            echo "no wheels in $ROOT/.whl: run 'bash benchmarks/gpu_check.sh --prepare' first, and carry .whl"
            return 2
        fi
        echo "installing what the image lacks, and petals, into $SITE:"
        "$PY" "$ROOT/benchmarks/gpu_wheels.py" install --wheels "$ROOT/.whl" --target "$SITE" || return 2
        export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
    fi
    echo "requirements of petals and of the carried packages:"
    "$PY" "$ROOT/benchmarks/gpu_wheels.py" check  # a report: what runs next says whether it matters
    "$PY" -c "import hivemind, petals_cli.commands.main" || return 2
    "$PY" "$ROOT/benchmarks/gpu_check.py" "$@"
}

main "$@" 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
