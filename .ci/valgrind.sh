#!/usr/bin/env bash
# valgrind memcheck over a representative script (every public op, success and error
# paths, threads on): fails on invalid reads/writes, uninitialised values or definite
# leaks whose stack passes through moe's extension.  Run after an install of moe.
set -euo pipefail
cd "$(dirname "$0")/.."
log=$(mktemp)
PYTHONMALLOC=malloc valgrind --tool=memcheck --leak-check=full \
    --show-leak-kinds=definite --errors-for-leak-kinds=definite --num-callers=40 \
    --log-file="$log" "$(python -c "import sys; print(sys.executable)")" .ci/valgrind_script.py
python .ci/valgrind_check.py "$log"
