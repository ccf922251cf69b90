#!/usr/bin/env bash
# Benchmark P7: a 1 GiB model spread to 1,000 sites in virtual time (token-bucket
# links, the agents' own peer choice from aigrid_store::swarm, no sleeping), at
# 1 Gbit/s and 100 Mbit/s site links with a 10 Gbit/s origin; beside the analytic
# lower bound, fleet-rollout waves 1,10,100,all, and every node pulling from the
# origin alone. Then the simulation is checked against real nodes: 8 and 16 peer
# services and staging agents on loopback (uploads paced to the link, the origin
# behind a link of its rate), each run beside the simulation of the same grid.
# Prints markdown tables.
#
# Arguments are passed to the binary's first run (the 1,000 sites), for example:
#   benchmarks/fanout/run.sh --nodes 200 --link-mbit 1000 --rtt-ms 0
#
#   FANOUT_LOOPBACK=0   skip the loopback check
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

BIN="$(build fanout)"
report "$BIN" --waves 1,10,100,all "$@"
if [ "${FANOUT_LOOPBACK:-1}" != "0" ]; then
    for nodes in 8 16; do
        echo
        # Loopback has no round trip to speak of and no download limit; the
        # origin serves every request at once, sharing its rate.
        report "$BIN" --loopback --baseline false --nodes "$nodes" --sites "$nodes" \
            --model-mib 64 --chunk-mib 1 --origin-mbit 100 --link-mbit 50,100 \
            --rtt-ms 0.2 --download-mbit 100000 --origin-slots 1000
    done
fi
