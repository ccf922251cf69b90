#!/usr/bin/env bash
# Benchmark P7: a 1 GiB model spread to 1,000 sites in virtual time (token-bucket
# links, the agents' own peer choice from aigrid_store::swarm, no sleeping), at
# 1 Gbit/s and 100 Mbit/s site links with a 10 Gbit/s origin; beside the analytic
# lower bound and every node pulling from the origin alone. Prints a markdown table.
#
# Arguments are passed to the binary, for example:
#   benchmarks/fanout/run.sh --nodes 200 --link-mbit 1000 --rtt-ms 0
#
# Environment:
#   BENCH_SKIP_BUILD=1  use the binary already in the target directory
#   BENCH_OUT           also append the table to this file
#   FANOUT_TRACE=1      print the spread second by second on stderr
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
case "$TARGET_DIR" in /*) ;; *) TARGET_DIR="$ROOT/$TARGET_DIR" ;; esac
# shellcheck source=../parts.sh
. "$ROOT/benchmarks/parts.sh"

report "$(build fanout)" "$@"
