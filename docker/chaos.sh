#!/usr/bin/env bash
# Runs the compose grid through failures while a client keeps working, then checks
# that nothing acknowledged was lost and that serving came back.
#
# The grid: 3 servers, 2 agents (agent1 with simulated GPUs), the store on the
# agents' data ports, the demo model served for circle `demo`, TLS throughout
# (docker/compose.yaml). A client on this host submits a job every half second
# (failing over between the servers) and asks `/v1` for a chat completion every
# half second, logging each answer with its time. Then, one after the other, each
# followed by a wait until the client's writes and `/v1` both succeed again:
#
#   1. the leader is killed (docker kill), and started again;
#   2. a follower is cut off the network (docker network disconnect), and put back;
#   3. the agent that runs the demo model is killed, and started again;
#   4. everything is restarted (docker compose restart).
#
# A recovery is timed from the moment the failure is in place (the kill or the cut
# done, the restart command returned) to the end of the first request of its kind
# that started after it.
#
# It prints how long each recovery took (writes, and `/v1`), and fails unless every
# job the servers acknowledged (2xx) is there at the end and `/v1` answers.
#
# Usage: docker/chaos.sh            (builds aigrid:dev first unless SKIP_BUILD=1)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
cd "$here"
aigrid="$root/target/release/aigrid"
work="$here/.chaos"
# Compose v2 (`docker compose`) where it is installed, else v1 (`docker-compose`).
if docker compose version >/dev/null 2>&1; then
    compose=(docker compose -f "$here/compose.yaml" -p aigrid-chaos)
else
    compose=(docker-compose -f "$here/compose.yaml" -p aigrid-chaos)
fi
container() { "${compose[@]}" --profile agents ps -q "$1"; }
servers="https://127.0.0.1:7701,https://127.0.0.1:7702,https://127.0.0.1:7703"

[ "${SKIP_BUILD:-0}" = 1 ] || "$here/build.sh"

say() { printf '%s %s\n' "$(date +%T)" "$*"; }
now() { date +%s.%N; }

# A fresh grid: its own admin identity, CA and volumes.
"${compose[@]}" --profile agents --profile demo down -v --remove-orphans >/dev/null 2>&1 || true
rm -rf "$work" "$here/ca"
mkdir -p "$work"
export AIGRID_IDENTITY="$work/admin.json"
export AIGRID_IDENTITY_FILE="$AIGRID_IDENTITY"
export AIGRID_SERVER="$servers"
"$aigrid" key new --name chaos-admin >/dev/null
AIGRID_ADMINS="$("$aigrid" key show --admin-entry)"
export AIGRID_ADMINS

cleanup() {
    [ -n "${client_pid:-}" ] && kill "$client_pid" 2>/dev/null || true
    if [ "${KEEP:-0}" != 1 ]; then
        "${compose[@]}" --profile agents --profile demo down -v --remove-orphans >/dev/null 2>&1 || true
    fi
}
trap cleanup EXIT

wait_for() { # what, seconds, command...
    local what="$1" limit="$2"
    shift 2
    local deadline=$((SECONDS + limit))
    until "$@" >/dev/null 2>&1; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            say "timed out waiting for $what"
            "${compose[@]}" --profile agents logs --tail 40 >&2 || true
            exit 1
        fi
        sleep 0.5
    done
}

say "starting the servers"
"${compose[@]}" up -d server1 server2 server3
# The `ca` service has made the CA by the time the servers start.
export AIGRID_CA_CERT="$here/ca/ca.pem"
wait_for "a leader" 120 "$aigrid" cluster status
export AIGRID_JOIN_TOKEN
AIGRID_JOIN_TOKEN="$("$aigrid" node token create --max-uses 10)"
say "starting the agents"
"${compose[@]}" --profile agents up -d agent1 agent2
nodes_ready() { [ "$("$aigrid" node ls --json | grep -o '"status": *"ready"' | wc -l)" -ge 2 ]; }
wait_for "two ready nodes" 120 nodes_ready

say "deploying the demo model for circle demo"
admin_pub="${AIGRID_ADMINS#*=}"
# A circle of one, whose quorum guards its own membership and policy; its models
# and jobs go through without proposals.
"$aigrid" circle create demo --member "$admin_pub" --threshold 1 \
    --guard circle.members,circle.policy >/dev/null
"${compose[@]}" --profile demo run --rm demo
api_key="$("$aigrid" apikey create --circle demo --name chaos --json | sed -n 's/.*"key": *"\([^"]*\)".*/\1/p')"
[ -n "$api_key" ] || { say "no API key was made"; exit 1; }

ask() { # one chat completion through any server's gateway
    local port
    for port in 7701 7702 7703; do
        if curl -sf --max-time 10 --cacert "$AIGRID_CA_CERT" \
            -H "authorization: Bearer $api_key" -H 'content-type: application/json' \
            -d '{"model":"tiny-llama","messages":[{"role":"user","content":"hi"}],"max_tokens":4}' \
            "https://127.0.0.1:$port/v1/chat/completions" >/dev/null; then
            return 0
        fi
    done
    return 1
}
wait_for "the demo model answering on /v1" 300 ask

# The client: a job every half second, a /v1 call every half second, each logged
# as `started finished kind ok|fail [name]`: a recovery counts only requests that
# started after the failure began.
log="$work/client.log"
: >"$log"
client() {
    local n=0
    while true; do
        n=$((n + 1))
        local name="chaos-$n"
        printf '{"name":"%s","kind":"batch","groups":[{"name":"main","count":1,"resources":{"cpu_millis":10,"memory_mib":16},"task":{"driver":"exec","command":"/usr/local/bin/aigrid","args":["--version"]}}]}' \
            "$name" >"$work/job.json"
        local started
        started="$(now)"
        if timeout 15 "$aigrid" job submit "$work/job.json" --wait-secs 0 >/dev/null 2>&1; then
            echo "$started $(now) job ok $name" >>"$log"
        else
            echo "$started $(now) job fail $name" >>"$log"
        fi
        started="$(now)"
        if ask; then
            echo "$started $(now) v1 ok" >>"$log"
        else
            echo "$started $(now) v1 fail" >>"$log"
        fi
        sleep 0.5
    done
}
client &
client_pid=$!
sleep 5

# Seconds from `since` until the end of the client's first success of `kind` that
# started after it.
recovered() { # kind since limit
    local kind="$1" since="$2" limit="$3"
    local deadline=$((SECONDS + limit))
    while [ "$SECONDS" -lt "$deadline" ]; do
        local at
        at="$(awk -v k="$kind" -v s="$since" '$3 == k && $4 == "ok" && $1 > s { print $2; exit }' "$log")"
        if [ -n "$at" ]; then
            awk -v a="$at" -v s="$since" 'BEGIN { printf "%.1f\n", a - s }'
            return 0
        fi
        sleep 0.5
    done
    echo "never"
    return 1
}

results=()
record() { # event: waits for writes and /v1 after the event began at $t0
    local event="$1" t0="$2" writes v1
    writes="$(recovered job "$t0" 180 || true)"
    v1="$(recovered v1 "$t0" 300 || true)"
    results+=("$(printf '| %s | %s | %s |' "$event" "$writes" "$v1")")
    say "$event: writes after ${writes}s, /v1 after ${v1}s"
}

leader() { "$aigrid" cluster status --json | sed -n 's/.*"leader": *\([0-9]*\).*/\1/p' | head -1; }

# 1. The leader dies.
l="$(leader)"
say "killing the leader, server$l"
docker kill "$(container "server$l")" >/dev/null
t0="$(now)"
record "leader (server$l) killed" "$t0"
"${compose[@]}" start "server$l" >/dev/null
sleep 5

# 2. A follower is cut off, then put back.
l="$(leader)"
f=$(((l % 3) + 1))
cut_off="$(container "server$f")"
network="$(docker inspect -f '{{range $k, $v := .NetworkSettings.Networks}}{{$k}}{{end}}' "$cut_off")"
say "cutting server$f off $network"
docker network disconnect "$network" "$cut_off"
t0="$(now)"
record "follower (server$f) partitioned" "$t0"
sleep 10
# Back with its service name, which other containers resolve it by.
docker network connect --alias "server$f" "$network" "$cut_off"
t0="$(now)"
follower_back() { "$aigrid" cluster status --server "https://127.0.0.1:770$f" --json | grep -q '"leader": *[1-9]'; }
wait_for "server$f back in the cluster" 120 follower_back
results+=("$(printf '| server%s rejoined after the partition | %s | - |' "$f" "$(awk -v a="$(now)" -v s="$t0" 'BEGIN { printf "%.1f", a - s }')")")

# 3. The agent running the demo model dies.
runs_demo="$("$aigrid" job status tiny-llama --json | python3 -c '
import json, sys
allocs = json.load(sys.stdin)["allocations"]
print(next(a["node_id"] for a in allocs if a["state"] == "running"))')"
say "killing $runs_demo, which serves the demo model"
docker kill "$(container "$runs_demo")" >/dev/null
t0="$(now)"
record "agent ($runs_demo, serving) killed" "$t0"
"${compose[@]}" --profile agents start "$runs_demo" >/dev/null

# 4. Everything restarts.
sleep 5
say "restarting everything"
began="$(now)"
"${compose[@]}" --profile agents restart >/dev/null
t0="$(now)"
record "whole grid restarted (one by one, $(awk -v a="$t0" -v s="$began" 'BEGIN { printf "%.1f", a - s }') s)" "$t0"

kill "$client_pid" 2>/dev/null || true
client_pid=""
wait 2>/dev/null || true

# Every acknowledged job is there.
acked="$(awk '$3 == "job" && $4 == "ok" { print $5 }' "$log" | sort -u)"
"$aigrid" job ls --json | grep -o '"name": *"chaos-[0-9]*"' | grep -o 'chaos-[0-9]*' | sort -u >"$work/present"
missing="$(comm -23 <(echo "$acked") "$work/present")"
n_acked="$(echo "$acked" | grep -c . || true)"
n_failed="$(awk '$3 == "job" && $4 == "fail"' "$log" | wc -l)"
v1_fail="$(awk '$3 == "v1" && $4 == "fail"' "$log" | wc -l)"
v1_ok="$(awk '$3 == "v1" && $4 == "ok"' "$log" | wc -l)"

echo
echo "| event | writes back after (s) | /v1 back after (s) |"
echo "|---|---|---|"
printf '%s\n' "${results[@]}"
echo
echo "jobs acknowledged: $n_acked (refused or timed out while recovering: $n_failed); /v1 calls: $v1_ok answered, $v1_fail failed"
if [ -n "$missing" ]; then
    echo "LOST: acknowledged jobs missing at the end: $missing"
    exit 1
fi
ask || { echo "FAILED: /v1 does not answer at the end"; exit 1; }
echo "no acknowledged job lost; /v1 answers"
