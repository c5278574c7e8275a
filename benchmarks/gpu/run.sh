#!/usr/bin/env bash
# The one-command GPU check of adacache-fx (see benchmarks/gpu/README.md).
#
#   bash benchmarks/gpu/run.sh              # on a CUDA machine: ~9 minutes at most, writes to $OUT
#   bash benchmarks/gpu/run.sh --dry-run    # on a CPU: tiny shapes, ~1-2 minutes (what CI runs)
#
# Options: --out DIR (default $OUT, else benchmarks/results/gpu), --total SECONDS (the whole
# run's time box; default 560, dry run 400). Run from the repository root. Python: $PYTHON,
# else the first of python3, python that imports torch.
#
# Parts, in order, each a `python -m benchmarks.gpu.<part>` in its own process under
# `timeout` (SIGTERM at its box, SIGKILL 10 s later): a part that fails or overruns never
# stops the others. A part's box is its nominal one, cut so that the later parts keep
# their minimum; the last part also gets whatever the earlier ones left unused. Each part
# gets a soft budget a little under its box and trims its own work to fit.
set -u -o pipefail

DRY=0
OUT_DIR="${OUT:-}"
TOTAL=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --out) OUT_DIR="$2"; shift ;;
        --total) TOTAL="$2"; shift ;;
        -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
        *) echo "run.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
START=$(date +%s)
[ -n "$OUT_DIR" ] || OUT_DIR="benchmarks/results/gpu"
mkdir -p "$OUT_DIR" && OUT_DIR="$(cd "$OUT_DIR" && pwd)"
[ -f adacache_fx/__init__.py ] || cd "$(dirname "$0")/../.."      # the repository root
if [ -z "$TOTAL" ]; then
    if [ "$DRY" = 1 ]; then TOTAL=400; else TOTAL=560; fi
fi
export PYTHONUNBUFFERED=1
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1      # the GPU machine has no internet: never wait for it
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"
else   # the first python that imports torch
    PY=""
    for cand in python3 python; do
        if command -v "$cand" >/dev/null 2>&1 && "$cand" -c "import torch" >/dev/null 2>&1; then PY=$cand; break; fi
    done
    [ -n "$PY" ] || PY=python3
fi
DRYFLAG=""
[ "$DRY" = 1 ] && DRYFLAG="--dry-run"
: > "$OUT_DIR/runlog.tsv"
echo "run.sh: out=$OUT_DIR python=$PY dry_run=$DRY total=${TOTAL}s"

left() { echo $(( START + TOTAL - $(date +%s) )); }

fallback_md() {  # part rc log: the part wrote nothing (crash before its first write, not started, ...)
    local f="$OUT_DIR/$1.md"
    {
        echo "# $1"
        echo
        echo "- status: **$2**"
        echo
        echo "## Results"
        echo
        echo "- $3"
        echo
        echo "## Details"
        echo
        if [ -f "$OUT_DIR/$1.log" ]; then echo '```'; tail -n 40 "$OUT_DIR/$1.log"; echo '```'; fi
    } > "$f"
}

# ---- part 0: environment (and the library importable) -----------------------------------
t0=$(date +%s)
: > "$OUT_DIR/install.log"
timeout -k 5 60 "$PY" -m benchmarks.gpu.env --out "$OUT_DIR" $DRYFLAG 2>&1 | tee "$OUT_DIR/env.log"
rc=$?
if [ "$rc" -eq 3 ]; then   # adacache_fx does not import (the repo root is on PYTHONPATH: a dependency is missing)
    echo "run.sh: adacache_fx does not import; trying pip install -e . --no-deps --no-build-isolation" | tee -a "$OUT_DIR/install.log"
    timeout -k 5 60 "$PY" -m pip install -e . --no-deps --no-build-isolation >>"$OUT_DIR/install.log" 2>&1
    timeout -k 5 60 "$PY" -m benchmarks.gpu.env --out "$OUT_DIR" $DRYFLAG 2>&1 | tee "$OUT_DIR/env.log"
    rc=$?
fi
[ -f "$OUT_DIR/env.md" ] || fallback_md env FAILED "python -m benchmarks.gpu.env exited $rc"
if [ -s "$OUT_DIR/install.log" ]; then { echo; echo "install.log:"; echo '```'; tail -n 30 "$OUT_DIR/install.log"; echo '```'; } >> "$OUT_DIR/env.md"; fi
printf 'env\t%s\t%s\t60\n' "$rc" "$(( $(date +%s) - t0 ))" >> "$OUT_DIR/runlog.tsv"

# ---- parts 1-5 ---------------------------------------------------------------------------
# name  nominal-box  minimum-box   (seconds; dry run: the same boxes, the parts take far less)
PARTS=(
    "kernel_check 70 25"
    "kernel_bench 45 15"
    "overhead_bf16 180 60"
    "demo 60 25"
    "cudagraphs 150 60"
)
FAIL=0
n=${#PARTS[@]}
for ((i = 0; i < n; i++)); do
    read -r name box minbox <<<"${PARTS[$i]}"
    reserve=0                                      # the later parts' minimum boxes + kill grace
    for ((j = i + 1; j < n; j++)); do
        read -r _ _ m <<<"${PARTS[$j]}"
        reserve=$(( reserve + m + 10 ))
    done
    usable=$(( $(left) - 15 ))                     # 15 s for the summary
    need=$(( reserve + minbox + 10 ))
    if [ "$need" -gt "$usable" ] && [ "$need" -gt 0 ]; then   # short of time: every minimum shrinks alike
        reserve=$(( reserve * (usable > 0 ? usable : 0) / need ))
    fi
    avail=$(( usable - reserve - 10 ))             # 10 s kill grace
    if [ $((i + 1)) -eq "$n" ] && [ "$avail" -gt "$box" ]; then box=$avail; fi   # the last part: the slack
    [ "$avail" -lt "$box" ] && box=$avail
    if [ "$box" -lt 10 ]; then
        echo "run.sh: $name not started: no time left"
        fallback_md "$name" "NOT RUN" "not started: only $(left) s of the ${TOTAL} s total were left"
        printf '%s\tnot run\t0\t0\n' "$name" >> "$OUT_DIR/runlog.tsv"
        FAIL=1
        continue
    fi
    budget=$(( box - (box / 10 > 8 ? box / 10 : 8) ))
    echo "run.sh: == $name (box ${box}s, soft budget ${budget}s, $(left)s left in total)"
    rm -f "$OUT_DIR/$name.md"
    t0=$(date +%s)
    if [ "$name" = kernel_check ] && [ "$DRY" = 1 ]; then
        # the kernel itself on CPU tensors: the Triton interpreter (set before triton is imported)
        TRITON_INTERPRET=1 timeout -k 10 "$box" "$PY" -m "benchmarks.gpu.$name" --out "$OUT_DIR" --budget "$budget" $DRYFLAG 2>&1 | tee "$OUT_DIR/$name.log"
    else
        env -u TRITON_INTERPRET timeout -k 10 "$box" "$PY" -m "benchmarks.gpu.$name" --out "$OUT_DIR" --budget "$budget" $DRYFLAG 2>&1 | tee "$OUT_DIR/$name.log"
    fi
    rc=$?
    secs=$(( $(date +%s) - t0 ))
    if [ ! -f "$OUT_DIR/$name.md" ]; then
        fallback_md "$name" "FAILED" "exit code $rc after ${secs} s before writing anything (log tail below)"
    elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        # killed before it could write its final status: say so in its file
        if grep -q '^- status: \*\*RUNNING\*\*' "$OUT_DIR/$name.md"; then
            sed -i 's/^- status: \*\*RUNNING\*\*/- status: **TIMED OUT (killed at the '"${box}"' s box)**/' "$OUT_DIR/$name.md"
        fi
    fi
    [ "$rc" -ne 0 ] && FAIL=1
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$secs" "$box" >> "$OUT_DIR/runlog.tsv"
    echo "run.sh: == $name exit $rc after ${secs}s"
done

# ---- summary -------------------------------------------------------------------------------
if ! timeout -k 5 30 "$PY" -m benchmarks.gpu.summary --out "$OUT_DIR" --total "$TOTAL" $DRYFLAG > "$OUT_DIR/summary.log" 2>&1; then
    { echo "# adacache-fx GPU check: summary (fallback: summary.py failed)"; echo; echo '```';
      cat "$OUT_DIR/runlog.tsv"; tail -n 20 "$OUT_DIR/summary.log"; echo '```'; } > "$OUT_DIR/summary.md"
    FAIL=1
fi
cat "$OUT_DIR/summary.md"
echo "run.sh: finished in $(( $(date +%s) - START )) s, results in $OUT_DIR"
exit "$FAIL"
