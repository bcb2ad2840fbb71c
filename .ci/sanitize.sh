#!/usr/bin/env bash
# Build moe._C with AddressSanitizer + UndefinedBehaviorSanitizer into a separate folder
# and run the test suite against it; any sanitizer report fails (ASan/UBSan abort the
# process, so the test or its subprocess fails).  The interpreter is not instrumented,
# so the ASan runtime is preloaded.  Usage: bash .ci/sanitize.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
out=$(mktemp -d)
python3 -m venv "$out/venv"
# shellcheck disable=SC1091
. "$out/venv/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q "numpy>=2" "setuptools>=77" pytest hypothesis
MOE_SANITIZE=1 python setup.py -q build_ext -b "$out/lib" -t "$out/tmp"
cp moe/*.py moe/*.pyi moe/py.typed "$out/lib/moe/"
export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
# Python's own allocations look like leaks at exit: leak checking is valgrind's job here.
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:detect_stack_use_after_return=1
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
export PYTHONPATH="$out/lib"
cd "$out"  # so the source tree's moe/ is not imported instead
python -c "import moe, sys; assert moe.__file__.startswith('$out'), moe.__file__; print('sanitized build:', moe.__file__)"
pytest -q -p no:cacheprovider "$root/tests" "$@"
