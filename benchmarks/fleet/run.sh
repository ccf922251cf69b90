#!/usr/bin/env bash
# Fleet heartbeat benchmark: AGENTS simulated agents (default 10,000) heartbeating
# every 10 s against a 3-server aigrid cluster, side by side with the same number
# of Kubernetes-style node-lease renewals (one etcd put per heartbeat) against a
# 3-member etcd cluster. Both on loopback with fsync on; the table shows the
# heartbeats handled per second, heartbeat latency and the servers' CPU and memory.
#
# Environment:
#   AGENTS              simulated agents / kubelets (default 10000)
#   BENCH_SECS          measured seconds (default 120)
#   INTERVAL_MS         heartbeat interval (default 10000)
#   RAMP_MS             how long the fleet takes to start (default 30000)
#   TARGETS             "aigrid etcd" (default), "aigrid" or "etcd"
#   BENCH_TMPDIR        parent of the scratch directory (a real disk)
#   BENCH_SKIP_BUILD=1  use the binaries already built
#   AIGRID_BASE_PORT    first server port (default 7801); the fleet's metrics use BASE+90
#   ETCD_BASE_PORT      etcd member i uses BASE+100*i and +1 (default 23279)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
case "$TARGET_DIR" in /*) ;; *) TARGET_DIR="$ROOT/$TARGET_DIR" ;; esac
BIN="$TARGET_DIR/release"
AGENTS="${AGENTS:-10000}"
BENCH_SECS="${BENCH_SECS:-120}"
INTERVAL_MS="${INTERVAL_MS:-10000}"
RAMP_MS="${RAMP_MS:-30000}"
TARGETS="${TARGETS:-aigrid etcd}"
BASE="${AIGRID_BASE_PORT:-7801}"
ETCD_BASE="${ETCD_BASE_PORT:-23279}"

log() { echo "==> $*" >&2; }
die() { echo "error: $*" >&2; exit 1; }

WORK=""
PIDS=()
stop_all() {
    local pid
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    PIDS=()
}
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    stop_all
    if [ -n "$WORK" ]; then
        if [ "$rc" -ne 0 ]; then echo "scratch directory kept: $WORK" >&2; else rm -rf "$WORK"; fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# until SECS CMD...: retries CMD every 500 ms for SECS seconds.
until_ok() {
    local deadline=$((SECONDS + $1))
    shift
    until "$@"; do
        [ "$SECONDS" -lt "$deadline" ] || return 1
        sleep 0.5
    done
}

field() { printf '%s\n' "$1" | sed -n "s/.*\"$2\":\"\{0,1\}\([^,\"}]*\)\"\{0,1\}[,}].*/\1/p"; }

if [ "${BENCH_SKIP_BUILD:-0}" != "1" ]; then
    log "building aigrid and the fleet benchmark (release)"
    (cd "$ROOT" && cargo build --release -p aigrid -p aigrid-benchmarks) || die "cargo build failed"
fi
if [[ "$TARGETS" == *etcd* ]] && ! command -v etcd >/dev/null 2>&1; then
    log "installing etcd-server"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y etcd-server >/dev/null 2>&1 || { apt-get update >/dev/null && apt-get install -y etcd-server >/dev/null; } \
        || die "etcd is missing and could not be installed"
fi
WORK="$(mktemp -d "${BENCH_TMPDIR:-${TMPDIR:-/tmp}}/aigrid-fleet.XXXXXX")"
log "scratch $WORK; $AGENTS agents, ${INTERVAL_MS} ms heartbeats, ${BENCH_SECS} s measured ($(nproc) CPUs)"
declare -A R

if [[ "$TARGETS" == *aigrid* ]]; then
    urls=""
    peers=""
    for i in 1 2 3; do
        peers="${peers:+$peers,}$i=127.0.0.1:$((BASE + 50 + i - 1))"
        urls="${urls:+$urls,}http://127.0.0.1:$((BASE + i - 1))"
    done
    servers=()
    "$BIN/aigrid" ca init --dir "$WORK/ca" >/dev/null
    for i in 1 2 3; do
        "$BIN/aigrid" server --id "$i" --listen "127.0.0.1:$((BASE + i - 1))" --peers "$peers" \
            --peer-listen "127.0.0.1:$((BASE + 50 + i - 1))" --ca-dir "$WORK/ca" \
            --data-dir "$WORK/server$i" >"$WORK/server$i.log" 2>&1 &
        PIDS+=("$!")
        servers+=("$!")
    done
    has_leader() { curl -fsS --max-time 2 "http://127.0.0.1:$BASE/api/v1/cluster" | grep -Eq '"leader":[1-9]'; }
    until_ok 60 has_leader || die "no aigrid leader"
    token="$("$BIN/aigrid" node token create --server "http://127.0.0.1:$BASE")"
    metrics="127.0.0.1:$((BASE + 90))"
    log "aigrid: starting $AGENTS agents over $((RAMP_MS / 1000)) s"
    "$BIN/aigrid" agent --servers "$urls" --join-token "$token" --data-dir "$WORK/fleet" \
        --simulate-fleet "$AGENTS" --simulate-gpus 8xH100-80GB \
        --heartbeat-interval-ms "$INTERVAL_MS" --fleet-ramp-ms "$RAMP_MS" \
        --metrics-listen "$metrics" >"$WORK/fleet.log" 2>&1 &
    PIDS+=("$!")
    fleet_pid=$!
    registered() {
        local n
        n="$(curl -fsS --max-time 2 "http://$metrics/metrics" | sed -n 's/^aigrid_agent_registered \([0-9]*\).*/\1/p')"
        [ "${n:-0}" -ge "$AGENTS" ]
    }
    until_ok $((RAMP_MS / 1000 + 300)) registered || { tail -20 "$WORK/fleet.log" >&2; die "the fleet did not register"; }
    log "aigrid: all registered; settling for one interval"
    sleep $((INTERVAL_MS / 1000 + 5))
    fleet_cpu0="$(awk '{print $14 + $15}' "/proc/$fleet_pid/stat")"
    line="$("$BIN/fleet" observe --servers "$urls" --fleet-metrics "http://$metrics/metrics" \
        --pids "$(IFS=,; echo "${servers[*]}")" --agents "$AGENTS" --secs "$BENCH_SECS")"
    fleet_cpu1="$(awk '{print $14 + $15}' "/proc/$fleet_pid/stat")"
    echo "$line"
    R[aigrid]="$line"
    R[fleet_cpu]="$(awk -v a="$fleet_cpu0" -v b="$fleet_cpu1" -v t="$(getconf CLK_TCK)" -v s="$BENCH_SECS" 'BEGIN { printf "%.1f", (b - a) / t / s * 100 }')"
    stop_all
fi

if [[ "$TARGETS" == *etcd* ]]; then
    initial=""
    endpoints=""
    for i in 1 2 3; do
        c=$((ETCD_BASE + 100 * i))
        initial="${initial:+$initial,}e$i=http://127.0.0.1:$((c + 1))"
        endpoints="${endpoints:+$endpoints,}http://127.0.0.1:$c"
    done
    members=()
    for i in 1 2 3; do
        c=$((ETCD_BASE + 100 * i))
        env -u ETCD_UNSAFE_NO_FSYNC etcd --name "e$i" --data-dir "$WORK/etcd$i" \
            --listen-client-urls "http://127.0.0.1:$c" --advertise-client-urls "http://127.0.0.1:$c" \
            --listen-peer-urls "http://127.0.0.1:$((c + 1))" --initial-advertise-peer-urls "http://127.0.0.1:$((c + 1))" \
            --initial-cluster "$initial" --initial-cluster-token "fleet-$$" --initial-cluster-state new \
            --logger zap --log-outputs stderr >"$WORK/etcd$i.log" 2>&1 &
        PIDS+=("$!")
        members+=("$!")
    done
    healthy() { curl -fsS --max-time 2 "http://127.0.0.1:$((ETCD_BASE + 100))/health" | grep -q '"health":"true"'; }
    until_ok 60 healthy || die "etcd did not become healthy"
    log "etcd: $AGENTS lease renewers"
    line="$("$BIN/fleet" lease --endpoints "$endpoints" --pids "$(IFS=,; echo "${members[*]}")" \
        --agents "$AGENTS" --interval-ms "$INTERVAL_MS" --secs "$BENCH_SECS")"
    echo "$line"
    R[etcd]="$line"
    stop_all
fi

row() {
    local name="$1" line="${R[$2]:-}"
    [ -n "$line" ] || return 0
    printf '| %s | %s | %s | %s | %s | %s | %s | %s |\n' "$name" "$(field "$line" agents)" \
        "$(field "$line" heartbeats_per_sec)" "$(field "$line" p50_ms)" "$(field "$line" p99_ms)" \
        "$(field "$line" cpu_pct_mean)" "$(field "$line" cpu_pct_max)" "$(field "$line" rss_mib_max)"
}
echo
echo "Fleet heartbeats: $AGENTS agents every $((INTERVAL_MS / 1000)) s, 3 servers on loopback, fsync on, ${BENCH_SECS} s measured ($(nproc) CPUs)"
echo
echo "| control plane | agents | heartbeats/s handled | p50 ms | p99 ms | server CPU % of a core (mean) | (max) | server peak RSS MiB |"
echo "|---|--:|--:|--:|--:|--:|--:|--:|"
row "aigrid (signed heartbeats, liveness batched)" aigrid
row "etcd (one lease put per heartbeat)" etcd
if [ -n "${R[fleet_cpu]:-}" ]; then
    echo
    echo "The simulated fleet process itself used ${R[fleet_cpu]}% of a core."
fi
