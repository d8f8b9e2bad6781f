#!/usr/bin/env bash
# Runs the overhead bench and keeps its report next to this script:
#   bench/results-<UTC time>-<commit>.txt
# Arguments go to the bench: bench/run.sh --quick, bench/run.sh --only tollgate, ...
set -euo pipefail
cd "$(dirname "$0")/.."
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
if ! git diff --quiet HEAD -- src Cargo.toml 2>/dev/null; then
    commit="$commit-dirty"
fi
out="bench/results-$(date -u +%Y%m%dT%H%M%SZ)-$commit.txt"
cargo bench --bench overhead --no-run
cargo bench --bench overhead -- "$@" | tee "$out"
echo "report saved to $out"
