#!/usr/bin/env bash
# Control-plane availability benchmark: how long acknowledged writes stop while
# a 3-node aigrid cluster and a 3-member etcd cluster lose their leader
# (SIGKILL) or change members (one joins, one leaves), under the same steady
# closed-loop write load (target/release/control_plane --marks). Every round
# starts a fresh cluster; the table gives the median and maximum over rounds.
#
# Environment (and those common.sh lists: TARGETS, BENCH_TMPDIR, BENCH_KEEP_TMP,
# BENCH_SKIP_BUILD, BENCH_OUT, AIGRID_BASE_PORT, ETCD_BASE_PORT, READY_TIMEOUT_SECS):
#   FAILOVER_SCENARIOS   "kill member" (default), "kill" or "member"
#   FAILOVER_ROUNDS      rounds per scenario and system, default 5
#   FAILOVER_CLIENTS     closed-loop writers, default 4
#   FAILOVER_LEAD_SECS   seconds of load before the disruption, default 2
#   FAILOVER_TAIL_SECS   seconds of load once the cluster has settled, default 2
#   FAILOVER_LEAVE       the member that leaves: leader (default) or follower
#   FAILOVER_REQUEST_TIMEOUT_SECS
#                        a writer gives up on a request after this long and
#                        tries the next server, default 2
#   FAILOVER_PROBE_MS    besides the writers, one write every this many ms that
#                        waits for no earlier one, default 20 (0: none)
#   FAILOVER_AIGRID_MEMBER_ARGS
#                        extra arguments of every aigrid server in the membership
#                        scenario, default "--snapshot-entries 1000": a server
#                        that joins catches up from a snapshot taken after it
#                        was added, and with the default threshold (100,000
#                        entries) the first one comes minutes later
set -euo pipefail

# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

FAILOVER_SCENARIOS="${FAILOVER_SCENARIOS:-kill member}"
FAILOVER_SCENARIOS="${FAILOVER_SCENARIOS//,/ }"
FAILOVER_ROUNDS="${FAILOVER_ROUNDS:-5}"
FAILOVER_CLIENTS="${FAILOVER_CLIENTS:-4}"
FAILOVER_LEAD_SECS="${FAILOVER_LEAD_SECS:-2}"
FAILOVER_TAIL_SECS="${FAILOVER_TAIL_SECS:-2}"
FAILOVER_LEAVE="${FAILOVER_LEAVE:-leader}"
FAILOVER_REQUEST_TIMEOUT_SECS="${FAILOVER_REQUEST_TIMEOUT_SECS:-2}"
FAILOVER_PROBE_MS="${FAILOVER_PROBE_MS:-20}"
FAILOVER_AIGRID_MEMBER_ARGS="${FAILOVER_AIGRID_MEMBER_ARGS-"--snapshot-entries 1000"}"

for s in $FAILOVER_SCENARIOS; do
    case "$s" in
        kill | member) ;;
        *) echo "unknown scenario '$s' in FAILOVER_SCENARIOS (expected kill and/or member)" >&2; exit 2 ;;
    esac
done
case "$FAILOVER_LEAVE" in
    leader | follower) ;;
    *) echo "FAILOVER_LEAVE is '$FAILOVER_LEAVE', expected leader or follower" >&2; exit 2 ;;
esac
for v in FAILOVER_ROUNDS FAILOVER_CLIENTS FAILOVER_LEAD_SECS FAILOVER_TAIL_SECS \
    FAILOVER_REQUEST_TIMEOUT_SECS FAILOVER_PROBE_MS; do
    case "${!v}" in
        '' | *[!0-9]*) echo "$v is '${!v}', expected a whole number" >&2; exit 2 ;;
    esac
done
[ "$FAILOVER_ROUNDS" -ge 1 ] || { echo "FAILOVER_ROUNDS must be at least 1" >&2; exit 2; }
[ "$FAILOVER_CLIENTS" -ge 1 ] || { echo "FAILOVER_CLIENTS must be at least 1" >&2; exit 2; }
[ "${BASH_VERSINFO[0]}" -ge 5 ] || die "bash 5 or later is needed (for \$EPOCHREALTIME)"

# The marks file of the round under way: the load generator reads it.
MARKS=""
mark() { printf '%s %s\n' "$1" "$EPOCHREALTIME" >>"$MARKS"; }

# The member that leaves in the membership scenario, given the leader.
leaving() {
    local leader="$1" n
    if [ "$FAILOVER_LEAVE" = "leader" ]; then
        echo "$leader"
        return
    fi
    for n in 1 2 3; do
        [ "$n" = "$leader" ] || { echo "$n"; return; }
    done
}

# A member of 1-3 other than $1.
other_than() {
    local n
    for n in 1 2 3; do
        [ "$n" = "$1" ] || { echo "$n"; return; }
    done
}

# ---------------------------------------------------------------- aigrid

# aigrid_member_object VIA ID -> the member entry for ID in VIA's status.
aigrid_member_object() {
    aigrid_cluster "$(aigrid_port "$1")" | grep -o "{[^{}]*\"id\":$2[,}][^{}]*}"
}

# aigrid_led_by_other OLD VIA: VIA names a leader other than OLD.
aigrid_led_by_other() {
    local leader
    leader="$(aigrid_leader "$2")"
    [ -n "$leader" ] && [ "$leader" != "null" ] && [ "$leader" != "$1" ]
}

# aigrid_voter VIA ID: VIA lists ID as a voter.
aigrid_voter() {
    aigrid_member_object "$1" "$2" | grep -q '"role":"voter"'
}

# aigrid_left VIA ID: VIA no longer lists ID and follows another leader.
aigrid_left() {
    local status
    status="$(aigrid_cluster "$(aigrid_port "$1")")" || return 1
    ! printf '%s' "$status" | grep -q "{[^{}]*\"id\":$2[,}]" && aigrid_led_by_other "$2" "$1"
}

# aigrid_start DIR SCENARIO
aigrid_start() {
    # shellcheck disable=SC2086 # one argument a word
    if [ "$2" = "member" ]; then
        start_aigrid "$1" $FAILOVER_AIGRID_MEMBER_ARGS
    else
        start_aigrid "$1"
    fi
    ENDPOINTS="$AIGRID_ENDPOINTS"
}
aigrid_pid() { echo "${AIGRID_PIDS[$1]}"; }
aigrid_current_leader() { aigrid_leader 1; }

# aigrid_add DIR VIA: server 4 starts and asks VIA to add it.
aigrid_add() {
    # shellcheck disable=SC2086 # one argument a word
    start_aigrid_server "$1" 4 --join "$SCHEME://127.0.0.1:$(aigrid_port "$2")" $FAILOVER_AIGRID_MEMBER_ARGS
}

# aigrid_joined VIA: VIA lists server 4 as a voter.
aigrid_joined() { aigrid_voter "$1" 4; }

# aigrid_remove VIA ID: asks VIA to remove server ID, signed as the admin.
aigrid_remove() {
    timeout "$READY_TIMEOUT_SECS" "$BIN_DIR/aigrid" cluster leave "$2" \
        --server "$SCHEME://127.0.0.1:$(aigrid_port "$1")" >/dev/null
}

# ---------------------------------------------------------------- etcd

declare -A ETCD_IDS

# etcd_status N -> member N's /v3/maintenance/status body.
etcd_status() {
    bcurl -fsS --max-time 2 -X POST -d '{}' "$SCHEME://127.0.0.1:$(etcd_client_port "$1")/v3/maintenance/status" 2>/dev/null
}

# etcd_led_by_other OLD VIA: VIA names a leader other than member OLD.
etcd_led_by_other() {
    local leader
    leader="$(json_field "$(etcd_status "$2")" leader)"
    [ -n "$leader" ] && [ "$leader" != "0" ] && [ "$leader" != "${ETCD_IDS[$1]}" ]
}

# etcd_left VIA N: VIA no longer lists member N and follows another leader.
etcd_left() {
    local members
    members="$(bcurl -fsS --max-time 2 -X POST -d '{}' \
        "$SCHEME://127.0.0.1:$(etcd_client_port "$1")/v3/cluster/member/list" 2>/dev/null)" || return 1
    ! printf '%s' "$members" | grep -q "\"ID\":\"${ETCD_IDS[$2]}\"" && etcd_led_by_other "$2" "$1"
}

etcd_start() {
    local n
    start_etcd "$1"
    ENDPOINTS="$ETCD_ENDPOINTS"
    for n in 1 2 3; do
        ETCD_IDS[$n]="$(json_field "$(etcd_status "$n")" member_id)"
        [ -n "${ETCD_IDS[$n]}" ] || die "etcd member $n did not say its id"
    done
}
etcd_pid() { echo "${ETCD_PIDS[$1]}"; }

etcd_current_leader() {
    local leader n
    leader="$(json_field "$(etcd_status 1)" leader)"
    for n in 1 2 3; do
        [ "${ETCD_IDS[$n]}" = "$leader" ] && { echo "$n"; return; }
    done
    echo "null"
}

# etcd_add DIR VIA: asks VIA to add member e4, then starts it.
etcd_add() {
    local peer4
    peer4="$SCHEME://127.0.0.1:$(etcd_peer_port 4)"
    # etcd refuses to add a member until the one asked has been connected to
    # all its peers for 5 s; asked again, it adds it then.
    await "etcd adds member e4" "$(etcd_pid "$2")" -- \
        bcurl -fs --max-time 5 -o /dev/null -X POST -d "{\"peerURLs\":[\"$peer4\"]}" \
        "$SCHEME://127.0.0.1:$(etcd_client_port "$2")/v3/cluster/member/add"
    start_etcd_member "$1" 4 "$ETCD_INITIAL,e4=$peer4" existing
}

# etcd_joined VIA: member e4 is healthy.
etcd_joined() { etcd_healthy "$(etcd_client_port 4)"; }

# etcd_remove VIA N: asks VIA to remove member N (which then stops by itself).
etcd_remove() {
    bcurl -fsS --max-time "$READY_TIMEOUT_SECS" -X POST -o /dev/null -d "{\"ID\":\"${ETCD_IDS[$2]}\"}" \
        "$SCHEME://127.0.0.1:$(etcd_client_port "$1")/v3/cluster/member/remove"
}

# ---------------------------------------------------------------- rounds

declare -A VALUES

# round TARGET SCENARIO N: a fresh cluster, the load, one disruption.
round() {
    local t="$1" scenario="$2" n="$3" dir leader survivor leave via line resume gap cap
    dir="$WORK/$t-$scenario-$n"
    mkdir -p "$dir"
    MARKS="$dir/marks"
    : >"$MARKS"
    "${t}_start" "$dir" "$scenario"
    # The limit only stops a script that never writes `end`.
    cap=$((FAILOVER_LEAD_SECS + 4 * READY_TIMEOUT_SECS + FAILOVER_TAIL_SECS))
    "$BIN_DIR/control_plane" --target "$t" --endpoints "$ENDPOINTS" "${LOAD_TLS_ARGS[@]}" \
        --clients "$FAILOVER_CLIENTS" --warmup-secs 0 --duration-secs "$cap" \
        --request-timeout-secs "$FAILOVER_REQUEST_TIMEOUT_SECS" --marks "$MARKS" \
        --probe-ms "$FAILOVER_PROBE_MS" \
        >"$dir/result.json" &
    LOAD_PID=$!
    sleep "$FAILOVER_LEAD_SECS"
    leader="$("${t}_current_leader")"
    case "$leader" in [123]) ;; *) fail "$t has no leader before the disruption" ;; esac
    case "$scenario" in
        kill)
            survivor="$(other_than "$leader")"
            log "$t round $n: SIGKILL to leader $leader"
            mark kill
            kill -9 "$("${t}_pid" "$leader")"
            # Reap it now, quietly: bash would report the kill.
            wait "$("${t}_pid" "$leader")" 2>/dev/null || true
            await "$t elects a new leader" "$("${t}_pid" "$survivor")" -- \
                "${t}_led_by_other" "$leader" "$survivor"
            ;;
        member)
            # Both requests go to a member that stays.
            leave="$(leaving "$leader")"
            via="$(other_than "$leave")"
            log "$t round $n: member 4 joins, $FAILOVER_LEAVE $leave leaves"
            mark change
            "${t}_add" "$dir" "$via"
            await "$t: member 4 joins" "${PIDS[@]}" -- "${t}_joined" "$via"
            mark joined
            "${t}_remove" "$via" "$leave" || fail "$t refused to remove member $leave"
            await "$t: member $leave leaves" "$("${t}_pid" "$via")" -- "${t}_left" "$via" "$leave"
            stop_pids "$("${t}_pid" "$leave")"
            mark left
            ;;
    esac
    sleep "$FAILOVER_TAIL_SECS"
    mark end
    if ! wait "$LOAD_PID"; then
        LOAD_PID=""
        die "load generator failed against $t ($scenario, round $n)"
    fi
    LOAD_PID=""
    stop_servers
    line="$(cat "$dir/result.json")"
    echo "$line"
    if [ -n "${BENCH_OUT:-}" ]; then
        printf '%s\n' "$line" | sed "s/^{/{\"scenario\":\"$scenario\",\"round\":$n,/" >>"$BENCH_OUT"
    fi
    resume="$(json_field "$line" resume_ms)"
    gap="$(json_field "$line" max_gap_ms)"
    if [ "$scenario" = "kill" ] && { [ -z "$resume" ] || [ "$resume" = "null" ]; }; then
        die "$t acknowledged no write sent after the kill (round $n)"
    fi
    VALUES["$t,$scenario,resume"]+=" $resume"
    VALUES["$t,$scenario,gap"]+=" $gap"
}

build_and_install
make_scratch
log "scratch directory $WORK ($FSTYPE), $FAILOVER_ROUNDS round(s), $FAILOVER_CLIENTS writer(s), scenarios: $FAILOVER_SCENARIOS"

for t in aigrid etcd; do
    [ "$t" = "aigrid" ] && [ "$RUN_AIGRID" != "1" ] && continue
    [ "$t" = "etcd" ] && [ "$RUN_ETCD" != "1" ] && continue
    for scenario in $FAILOVER_SCENARIOS; do
        for n in $(seq 1 "$FAILOVER_ROUNDS"); do
            round "$t" "$scenario" "$n"
        done
    done
done

# ---------------------------------------------------------------- report

# summary KEY median|max -> over the rounds' values, "-" when there are none;
# the median of an even count is the lower middle one.
summary() {
    # shellcheck disable=SC2086 # one value per word
    printf '%s\n' ${VALUES[$1]:-} | sort -g | awk -v what="$2" '
        NF { v[++n] = $1 }
        END {
            if (n == 0) { print "-"; exit }
            if (what == "max") print v[n]; else print v[int((n + 1) / 2)]
        }'
}

row() {
    local scenario="$1" metric="$2" label="$3"
    printf '| %s | %s | %s | %s | %s |\n' "$label" \
        "$(summary "aigrid,$scenario,$metric" median)" "$(summary "aigrid,$scenario,$metric" max)" \
        "$(summary "etcd,$scenario,$metric" median)" "$(summary "etcd,$scenario,$metric" max)"
}

echo
echo "Control-plane availability, 3 nodes on loopback, fsync on, $FAILOVER_CLIENTS writers," \
    "$FAILOVER_ROUNDS round(s) each ($(nproc) CPUs, load $(cut -d' ' -f1 /proc/loadavg), scratch on $FSTYPE)"
echo
echo "| ms | aigrid median | aigrid max | etcd median | etcd max |"
echo "|----|--------------:|-----------:|------------:|---------:|"
for scenario in $FAILOVER_SCENARIOS; do
    case "$scenario" in
        kill)
            row kill resume "leader SIGKILL: to the first acknowledged write sent after it"
            row kill gap "leader SIGKILL: longest gap between acknowledged writes"
            ;;
        member)
            row member gap "member joins, $FAILOVER_LEAVE leaves: longest gap between acknowledged writes"
            ;;
    esac
done
