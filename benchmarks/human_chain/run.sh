#!/usr/bin/env bash
# Human Chain benchmark, in process on the replicated apply path: signed approvals
# applied per second (ed25519, and hybrid ed25519 + ML-DSA-65) beside the bound of
# verifying the same signatures alone, and job submissions applied per second with
# the audit log beside the same submissions without it. Prints markdown tables.
#
# Arguments are passed to the binary, for example:
#   benchmarks/human_chain/run.sh --proposals 500 --submissions 50000
#
# Environment:
#   BENCH_SKIP_BUILD=1  use the binary already in the target directory
#   BENCH_OUT           also append the tables to this file
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
case "$TARGET_DIR" in /*) ;; *) TARGET_DIR="$ROOT/$TARGET_DIR" ;; esac
BIN="$TARGET_DIR/release/human_chain"

if [ "${BENCH_SKIP_BUILD:-0}" != "1" ]; then
    echo "==> building human_chain (release)" >&2
    (cd "$ROOT" && cargo build --release -p aigrid-benchmarks --bin human_chain) \
        || { echo "error: cargo build failed" >&2; exit 1; }
fi
[ -x "$BIN" ] || { echo "error: $BIN is missing" >&2; exit 1; }

if [ -n "${BENCH_OUT:-}" ]; then
    "$BIN" "$@" | tee -a "$BENCH_OUT"
else
    "$BIN" "$@"
fi
