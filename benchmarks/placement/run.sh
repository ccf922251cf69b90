#!/usr/bin/env bash
# Placement benchmark: aigrid's pure planner against a naive first-fit planner on
# the same seeded workload (10,000 simulated 8-GPU nodes by default), in process.
# Builds target/release/placement and runs `placement planner`, which prints a
# markdown table: placements per second and packing quality, side by side.
#
# Arguments are passed to `placement planner`, for example:
#   benchmarks/placement/run.sh --nodes 20000 --seed 7
#   benchmarks/placement/run.sh --jobs 200
#   benchmarks/placement/run.sh --fill 1.3
# With `pass` first, it runs `placement pass` instead: the leader's whole
# scheduling pass over the real state, circles' quotas on beside off:
#   benchmarks/placement/run.sh pass --circles 4 --fill 1.5
#
# Environment:
#   BENCH_SKIP_BUILD=1  use the binary already in the target directory
#   BENCH_OUT           also append the table to this file
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
case "$TARGET_DIR" in /*) ;; *) TARGET_DIR="$ROOT/$TARGET_DIR" ;; esac
BIN="$TARGET_DIR/release/placement"

if [ "${BENCH_SKIP_BUILD:-0}" != "1" ]; then
    echo "==> building placement (release)" >&2
    (cd "$ROOT" && cargo build --release -p aigrid-benchmarks --bin placement) \
        || { echo "error: cargo build failed" >&2; exit 1; }
fi
[ -x "$BIN" ] || { echo "error: $BIN is missing" >&2; exit 1; }

SUBCOMMAND=planner
if [ "${1:-}" = "pass" ] || [ "${1:-}" = "planner" ]; then
    SUBCOMMAND="$1"
    shift
fi
if [ -n "${BENCH_OUT:-}" ]; then
    "$BIN" "$SUBCOMMAND" "$@" | tee -a "$BENCH_OUT"
else
    "$BIN" "$SUBCOMMAND" "$@"
fi
