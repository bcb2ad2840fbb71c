#!/usr/bin/env bash
# Bounded fuzzing (atheris) of argument handling and of the safetensors reader.  A crash
# input is copied into tests/fuzz/regressions/<target>/ (replayed by the test suite) and
# fails the run.  Usage: bash .ci/fuzz.sh [SECONDS per target, default 60]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-60}
work=$(mktemp -d)
python -m pip install -q atheris
status=0
for target in api safetensors; do
    corpus="$work/corpus-$target"
    mkdir -p "$corpus" "$work/crash-$target"
    cp tests/fuzz/regressions/$target/* "$corpus/" 2>/dev/null || true
    if [ "$target" = safetensors ]; then
        python tests/fuzz/fuzz_safetensors.py --seeds "$corpus"
    fi
    echo "== fuzzing $target for ${secs}s"
    if ! python "tests/fuzz/fuzz_$target.py" "$corpus" -max_total_time="$secs" \
            -rss_limit_mb=4096 -artifact_prefix="$work/crash-$target/" \
            > "$work/$target.log" 2>&1; then
        status=1
        tail -40 "$work/$target.log"
        cp "$work/crash-$target/"* "tests/fuzz/regressions/$target/" 2>/dev/null || true
        echo "fuzz $target: a finding was kept in tests/fuzz/regressions/$target/"
    else
        grep -E "Done [0-9]+ runs|#[0-9]+.*DONE" "$work/$target.log" | tail -1 || true
    fi
done
exit $status
