#!/usr/bin/env bash
# Control-plane write benchmark: a 3-node aigrid cluster against a 3-member
# etcd cluster, both on loopback with fsync on, driven by the same closed-loop
# load generator (target/release/control_plane) at several client counts; by
# default over TLS on both sides (BENCH_TLS, see common.sh).
#
# Environment (and those common.sh lists: TARGETS, BENCH_TMPDIR, BENCH_KEEP_TMP,
# BENCH_SKIP_BUILD, BENCH_OUT, AIGRID_BASE_PORT, ETCD_BASE_PORT, READY_TIMEOUT_SECS):
#   BENCH_CLIENTS       client counts to run, default "1 16 64"
#   BENCH_SECS          measured seconds per run, default 10
#   BENCH_WARMUP_SECS   unmeasured warm-up seconds per run, default 2
set -euo pipefail

# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

BENCH_CLIENTS="${BENCH_CLIENTS:-1 16 64}"
BENCH_CLIENTS="${BENCH_CLIENTS//,/ }"
BENCH_SECS="${BENCH_SECS:-10}"
BENCH_WARMUP_SECS="${BENCH_WARMUP_SECS:-2}"

declare -A RESULT
declare -A FIRST_ROLE

# aigrid_first_role: whether server 1 (the endpoint one client writes to) leads.
aigrid_first_role() {
    aigrid_cluster "$(aigrid_port 1)" | python3 -c '
import json, sys
leader = json.load(sys.stdin).get("leader")
print("the leader" if leader == 1 else f"a follower (server {leader} led)")' 2>/dev/null || echo "unknown"
}

# etcd_first_role: the same for member e1, from its status.
etcd_first_role() {
    bcurl -fsS --max-time 2 -X POST -d '{}' \
        "$SCHEME://127.0.0.1:$(etcd_client_port 1)/v3/maintenance/status" 2>/dev/null | python3 -c '
import json, sys
status = json.load(sys.stdin)
me, leader = status["header"]["member_id"], status["leader"]
print("the leader" if me == leader else "a follower")' 2>/dev/null || echo "unknown"
}

# run_load TARGET ENDPOINTS
run_load() {
    local target="$1" endpoints="$2" clients line ops errors
    for clients in $BENCH_CLIENTS; do
        log "$target: $clients client(s), ${BENCH_WARMUP_SECS}s warm-up + ${BENCH_SECS}s"
        # Run in the background and wait, so a signal interrupts the wait
        # and the cleanup trap runs at once.
        "$BIN_DIR/control_plane" --target "$target" --endpoints "$endpoints" "${LOAD_TLS_ARGS[@]}" \
            --clients "$clients" --duration-secs "$BENCH_SECS" \
            --warmup-secs "$BENCH_WARMUP_SECS" >"$WORK/result.json" &
        LOAD_PID=$!
        if ! wait "$LOAD_PID"; then
            LOAD_PID=""
            die "load generator failed against $target with $clients client(s)"
        fi
        LOAD_PID=""
        line="$(cat "$WORK/result.json")"
        echo "$line"
        if [ -n "${BENCH_OUT:-}" ]; then
            echo "$line" >>"$BENCH_OUT"
        fi
        ops="$(json_field "$line" ops)"
        errors="$(json_field "$line" errors)"
        if [ "${ops:-0}" = "0" ]; then
            die "$target with $clients client(s) completed no request ($errors errors)"
        fi
        if [ "${errors:-0}" != "0" ]; then
            log "warning: $target with $clients client(s) saw $errors failed request(s)"
        fi
        RESULT["$target,$clients,ops"]="$(json_field "$line" ops_per_sec)"
        RESULT["$target,$clients,p50"]="$(json_field "$line" p50_ms)"
        RESULT["$target,$clients,p99"]="$(json_field "$line" p99_ms)"
    done
}

build_and_install
make_scratch
log "scratch directory $WORK ($FSTYPE), ${BENCH_SECS}s per run, clients: $BENCH_CLIENTS, TLS: $BENCH_TLS"

if [ "$RUN_AIGRID" = "1" ]; then
    start_aigrid "$WORK"
    FIRST_ROLE[aigrid]="$(aigrid_first_role)"
    run_load aigrid "$AIGRID_ENDPOINTS"
    log "aigrid: stopping"
    stop_servers
fi

if [ "$RUN_ETCD" = "1" ]; then
    start_etcd "$WORK"
    FIRST_ROLE[etcd]="$(etcd_first_role)"
    run_load etcd "$ETCD_ENDPOINTS"
    log "etcd: stopping"
    stop_servers
fi

# ---------------------------------------------------------------- report

val() { echo "${RESULT[$1]:--}"; }

echo
if [ "$BENCH_TLS" = "1" ]; then
    tls_note="clients over TLS, members over mutual TLS; aigrid writes signed"
else
    tls_note="plain HTTP (aigrid's Raft over mutual TLS); aigrid writes signed"
fi
echo "Control-plane writes, 3 nodes on loopback, fsync on, $tls_note, ${BENCH_SECS}s per run ($(nproc) CPUs, scratch on $FSTYPE)"
echo
echo "| clients | aigrid ops/s | aigrid p50 ms | aigrid p99 ms | etcd ops/s | etcd p50 ms | etcd p99 ms | aigrid/etcd ops/s |"
echo "|--------:|-------------:|--------------:|--------------:|-----------:|------------:|------------:|------------------:|"
for clients in $BENCH_CLIENTS; do
    a="$(val "aigrid,$clients,ops")"
    e="$(val "etcd,$clients,ops")"
    ratio="-"
    if [ "$a" != "-" ] && [ "$e" != "-" ]; then
        ratio="$(awk -v a="$a" -v e="$e" 'BEGIN { if (e > 0) printf "%.2f", a / e; else print "-" }')"
    fi
    printf '| %s | %s | %s | %s | %s | %s | %s | %s |\n' "$clients" \
        "$a" "$(val "aigrid,$clients,p50")" "$(val "aigrid,$clients,p99")" \
        "$e" "$(val "etcd,$clients,p50")" "$(val "etcd,$clients,p99")" "$ratio"
done
echo
echo "Client i writes to endpoint i mod 3; the first endpoint was ${FIRST_ROLE[aigrid]:-not run} for aigrid and ${FIRST_ROLE[etcd]:-not run} for etcd."
