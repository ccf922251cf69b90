#!/usr/bin/env bash
# Placement end to end: 1,000,000 allocations (10,000 jobs x 100 instances) onto
# 10,000 simulated 8-GPU nodes through a 3-server aigrid cluster on loopback, with
# fsync'd Raft logs, commits included. Builds target/release/aigrid and
# target/release/placement_e2e, then prints wall time, placements/s and the
# servers' peak RSS beside the published anchors (Nomad C1M, the Kubernetes
# scheduler's CI floor).
#
# Arguments are passed to placement_e2e, for example:
#   benchmarks/placement/e2e.sh --nodes 1000 --jobs 1000      # a quick run
#
# Environment:
#   BENCH_SKIP_BUILD=1  use the binaries already in the target directory
#   BENCH_TMPDIR        parent of the servers' data directories (default $TMPDIR
#                       or /tmp); must be a real disk, not tmpfs
#   BENCH_OUT           also append the table to this file
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
case "$TARGET_DIR" in /*) ;; *) TARGET_DIR="$ROOT/$TARGET_DIR" ;; esac
BIN="$TARGET_DIR/release/placement_e2e"
AIGRID="$TARGET_DIR/release/aigrid"

if [ "${BENCH_SKIP_BUILD:-0}" != "1" ]; then
    echo "==> building aigrid and placement_e2e (release)" >&2
    (cd "$ROOT" && cargo build --release -p aigrid -p aigrid-benchmarks --bin aigrid --bin placement_e2e) \
        || { echo "error: cargo build failed" >&2; exit 1; }
fi
for b in "$BIN" "$AIGRID"; do
    [ -x "$b" ] || { echo "error: $b is missing" >&2; exit 1; }
done

DATA="${BENCH_TMPDIR:-${TMPDIR:-/tmp}}"
if [ -n "${BENCH_OUT:-}" ]; then
    "$BIN" --aigrid "$AIGRID" --data-dir "$DATA" "$@" | tee -a "$BENCH_OUT"
else
    "$BIN" --aigrid "$AIGRID" --data-dir "$DATA" "$@"
fi
