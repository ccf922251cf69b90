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
#   BENCH_REPS          repetitions, default 3: each starts fresh clusters; the
#                       table shows the run with the median ops/s of each system
#                       and load, the range, and each repetition's pair (ops/s
#                       ratio, p99s)
#   BENCH_PAIRING       how a repetition's pairs are made: "load" (default) starts
#                       both systems' clusters and runs each load on one system
#                       right after the other (aigrid first in odd repetitions, etcd
#                       first in even ones), the other cluster idle meanwhile, so a
#                       pair is measured seconds apart; "run" runs every load on
#                       aigrid, stops it, then every load on etcd
#   BENCH_SETTLE_SECS   pause before each load under "load" pairing, so that what the
#                       last load left behind (followers catching up, compaction)
#                       settles first, default 2
set -euo pipefail

# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

BENCH_CLIENTS="${BENCH_CLIENTS:-1 16 64}"
BENCH_CLIENTS="${BENCH_CLIENTS//,/ }"
BENCH_SECS="${BENCH_SECS:-10}"
BENCH_WARMUP_SECS="${BENCH_WARMUP_SECS:-2}"
BENCH_REPS="${BENCH_REPS:-3}"
[[ "$BENCH_REPS" =~ ^[1-9][0-9]*$ ]] || die "BENCH_REPS must be a positive integer, not '$BENCH_REPS'"
BENCH_PAIRING="${BENCH_PAIRING:-load}"
case "$BENCH_PAIRING" in
    load | run) ;;
    *) die "BENCH_PAIRING must be load or run, not '$BENCH_PAIRING'" ;;
esac
BENCH_SETTLE_SECS="${BENCH_SETTLE_SECS:-2}"
[[ "$BENCH_SETTLE_SECS" =~ ^[0-9]+$ ]] || die "BENCH_SETTLE_SECS must be a whole number of seconds, not '$BENCH_SETTLE_SECS'"

declare -A RESULT
# The endpoints of each system's leader and of one follower: one client's write
# takes a hop more through a follower on either system, so the one-client load runs
# once against each and the table compares like with like.
declare -A ROLE_ENDPOINT

# aigrid_roles: ROLE_ENDPOINT[aigrid,leader] and [aigrid,follower].
aigrid_roles() {
    local leader
    leader="$(aigrid_leader 1)"
    [[ "$leader" =~ ^[0-9]+$ ]] || die "aigrid names no leader"
    ROLE_ENDPOINT[aigrid,leader]="$SCHEME://127.0.0.1:$(aigrid_port "$leader")"
    ROLE_ENDPOINT[aigrid,follower]="$SCHEME://127.0.0.1:$(aigrid_port $((leader % 3 + 1)))"
}

# etcd_roles: the same for etcd, from each member's status.
etcd_roles() {
    local id url role
    for id in 1 2 3; do
        url="$SCHEME://127.0.0.1:$(etcd_client_port "$id")"
        role="$(bcurl -fsS --max-time 2 -X POST -d '{}' "$url/v3/maintenance/status" 2>/dev/null | python3 -c '
import json, sys
status = json.load(sys.stdin)
print("leader" if status["header"]["member_id"] == status["leader"] else "follower")' 2>/dev/null)" || true
        case "$role" in
            leader | follower) ROLE_ENDPOINT[etcd,$role]="$url" ;;
        esac
    done
    [ -n "${ROLE_ENDPOINT[etcd,leader]:-}" ] || die "etcd names no leader"
    [ -n "${ROLE_ENDPOINT[etcd,follower]:-}" ] || die "etcd has no follower"
}

# The loads of one client count: "1" runs twice, "1L" against the leader and "1F"
# against a follower; any other count runs once, client i on endpoint i mod 3.
LOADS=()
for clients in $BENCH_CLIENTS; do
    if [ "$clients" = "1" ]; then LOADS+=(1L 1F); else LOADS+=("$clients"); fi
done

# load_label LOAD: the table's first column.
load_label() {
    case "$1" in
        1L) echo "1, on the leader" ;;
        1F) echo "1, on a follower" ;;
        *) echo "$1" ;;
    esac
}

# run_load TARGET ENDPOINTS REP LOAD...: runs each LOAD on TARGET, whose clients
# are at ENDPOINTS.
run_load() {
    local target="$1" all="$2" rep="$3" load clients endpoints line ops errors
    shift 3
    for load in "$@"; do
        case "$load" in
            1L) clients=1 endpoints="${ROLE_ENDPOINT[$target,leader]}" ;;
            1F) clients=1 endpoints="${ROLE_ENDPOINT[$target,follower]}" ;;
            *) clients="$load" endpoints="$all" ;;
        esac
        log "$target (run $rep of $BENCH_REPS): clients $(load_label "$load"), ${BENCH_WARMUP_SECS}s warm-up + ${BENCH_SECS}s"
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
        RESULT["$target,$load,$rep,ops"]="$(json_field "$line" ops_per_sec)"
        RESULT["$target,$load,$rep,p50"]="$(json_field "$line" p50_ms)"
        RESULT["$target,$load,$rep,p99"]="$(json_field "$line" p99_ms)"
    done
}

build_and_install
make_scratch
log "scratch directory $WORK ($FSTYPE), ${BENCH_SECS}s per run, clients: $BENCH_CLIENTS, TLS: $BENCH_TLS"

# start_system TARGET DIR: starts TARGET's cluster with its data in DIR and
# notes its leader's and a follower's endpoints.
start_system() {
    case "$1" in
        aigrid) start_aigrid "$2" && aigrid_roles ;;
        etcd) start_etcd "$2" && etcd_roles ;;
    esac
}

# endpoints_of TARGET: every server's URL.
endpoints_of() {
    case "$1" in
        aigrid) echo "$AIGRID_ENDPOINTS" ;;
        etcd) echo "$ETCD_ENDPOINTS" ;;
    esac
}

SYSTEMS=()
[ "$RUN_AIGRID" = "1" ] && SYSTEMS+=(aigrid)
[ "$RUN_ETCD" = "1" ] && SYSTEMS+=(etcd)
PAIRED=0
[ "$BENCH_PAIRING" = "load" ] && [ "${#SYSTEMS[@]}" = 2 ] && PAIRED=1
for rep in $(seq 1 "$BENCH_REPS"); do
    if [ "$PAIRED" = "0" ]; then
        for target in "${SYSTEMS[@]}"; do
            start_system "$target" "$WORK/run$rep"
            run_load "$target" "$(endpoints_of "$target")" "$rep" "${LOADS[@]}"
            log "$target: stopping"
            stop_servers
        done
        continue
    fi
    for target in "${SYSTEMS[@]}"; do
        start_system "$target" "$WORK/run$rep"
    done
    order="aigrid etcd"
    [ $((rep % 2)) = 0 ] && order="etcd aigrid"
    for load in "${LOADS[@]}"; do
        for target in $order; do
            sleep "$BENCH_SETTLE_SECS"
            run_load "$target" "$(endpoints_of "$target")" "$rep" "$load"
        done
    done
    log "stopping both clusters"
    stop_servers
done

# ---------------------------------------------------------------- report

val() { echo "${RESULT[$1]:--}"; }

# median_rep TARGET LOAD: the repetition whose ops/s is the median (the lower of
# the two middle ones for an even count); nothing when the target did not run.
median_rep() {
    local rep
    for rep in $(seq 1 "$BENCH_REPS"); do
        if [ -n "${RESULT[$1,$2,$rep,ops]:-}" ]; then
            echo "${RESULT[$1,$2,$rep,ops]} $rep"
        fi
    done | sort -g | awk '{ r[NR] = $2 } END { if (NR) print r[int((NR + 1) / 2)] }'
}

# ops_cell TARGET LOAD REP: the median's ops/s, with the range over repetitions.
ops_cell() {
    local rep
    [ -n "$3" ] || { echo "-"; return; }
    [ "$BENCH_REPS" = "1" ] && { echo "${RESULT[$1,$2,$3,ops]}"; return; }
    for rep in $(seq 1 "$BENCH_REPS"); do
        echo "${RESULT[$1,$2,$rep,ops]}"
    done | sort -g | awk -v median="${RESULT[$1,$2,$3,ops]}" \
        'NR == 1 { lo = $1 } { hi = $1 } END { print median " (" lo "-" hi ")" }'
}

ratio() {
    awk -v a="$1" -v e="$2" 'BEGIN { if (e > 0) printf "%.2f", a / e; else print "-" }'
}

echo
if [ "$BENCH_TLS" = "1" ]; then
    tls_note="clients over TLS, members over mutual TLS; aigrid writes signed"
else
    tls_note="plain HTTP (aigrid's Raft over mutual TLS); aigrid writes signed"
fi
if [ "$PAIRED" = "1" ]; then
    pairing="both clusters up, each load run on one system right after the other"
else
    pairing="each system's loads in turn"
fi
echo "Control-plane writes, 3 nodes on loopback, fsync on, $tls_note, ${BENCH_SECS}s per run, $BENCH_REPS run(s) on fresh clusters ($pairing), the median run shown ($(nproc) CPUs, scratch on $FSTYPE)"
echo
echo "| clients | aigrid ops/s | aigrid p50 ms | aigrid p99 ms | etcd ops/s | etcd p50 ms | etcd p99 ms | aigrid/etcd ops/s | aigrid/etcd, each run | p99 ms aigrid vs etcd, each run |"
echo "|--------:|-------------:|--------------:|--------------:|-----------:|------------:|------------:|------------------:|:--|:--|"
for load in "${LOADS[@]}"; do
    a="$(median_rep aigrid "$load")"
    e="$(median_rep etcd "$load")"
    median_ratio="-"
    each="-"
    tails="-"
    if [ -n "$a" ] && [ -n "$e" ]; then
        median_ratio="$(ratio "${RESULT[aigrid,$load,$a,ops]}" "${RESULT[etcd,$load,$e,ops]}")"
        each="$(for rep in $(seq 1 "$BENCH_REPS"); do
            ratio "${RESULT[aigrid,$load,$rep,ops]}" "${RESULT[etcd,$load,$rep,ops]}"
            echo
        done | paste -sd/ | sed 's|/| / |g')"
        tails="$(for rep in $(seq 1 "$BENCH_REPS"); do
            echo "${RESULT[aigrid,$load,$rep,p99]} vs ${RESULT[etcd,$load,$rep,p99]}"
        done | paste -sd/ | sed 's|/|; |g')"
    fi
    printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' "$(load_label "$load")" \
        "$(ops_cell aigrid "$load" "$a")" "$(val "aigrid,$load,$a,p50")" "$(val "aigrid,$load,$a,p99")" \
        "$(ops_cell etcd "$load" "$e")" "$(val "etcd,$load,$e,p50")" "$(val "etcd,$load,$e,p99")" \
        "$median_ratio" "$each" "$tails"
done
echo
echo "One client writes to each system's leader, then to one of its followers (a hop more on both); at higher counts client i writes to endpoint i mod 3."
