#!/usr/bin/env bash
# Control-plane write benchmark: a 3-node aigrid cluster against a 3-member
# etcd cluster, both on loopback with fsync on, driven by the same closed-loop
# load generator (target/release/control_plane) at several client counts.
#
# Environment:
#   TARGETS             "aigrid etcd" (default), "aigrid" or "etcd" (space or comma separated)
#   BENCH_CLIENTS       client counts to run, default "1 16 64"
#   BENCH_SECS          measured seconds per run, default 10
#   BENCH_WARMUP_SECS   unmeasured warm-up seconds per run, default 2
#   BENCH_TMPDIR        parent of the scratch directory (default $TMPDIR or /tmp);
#                       must be a real disk, not tmpfs, or fsync costs nothing
#   BENCH_KEEP_TMP=1    keep the scratch directory (data and logs) afterwards
#   BENCH_SKIP_BUILD=1  use the binaries already in the target directory
#   BENCH_OUT           also append every JSON result line to this file
#   AIGRID_BASE_PORT    first aigrid port, nodes use BASE, BASE+1, BASE+2 (default 7701)
#   ETCD_BASE_PORT      etcd member i listens for clients on BASE+100*i and
#                       for peers on BASE+100*i+1 (default 22279 -> 22379/22380, ...)
#   READY_TIMEOUT_SECS  how long a cluster may take to elect a leader (default 60)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
case "$TARGET_DIR" in /*) ;; *) TARGET_DIR="$ROOT/$TARGET_DIR" ;; esac
BIN_DIR="$TARGET_DIR/release"

TARGETS="${TARGETS:-aigrid etcd}"
TARGETS="${TARGETS//,/ }"
BENCH_CLIENTS="${BENCH_CLIENTS:-1 16 64}"
BENCH_CLIENTS="${BENCH_CLIENTS//,/ }"
BENCH_SECS="${BENCH_SECS:-10}"
BENCH_WARMUP_SECS="${BENCH_WARMUP_SECS:-2}"
AIGRID_BASE_PORT="${AIGRID_BASE_PORT:-7701}"
ETCD_BASE_PORT="${ETCD_BASE_PORT:-22279}"
READY_TIMEOUT_SECS="${READY_TIMEOUT_SECS:-60}"

RUN_AIGRID=0
RUN_ETCD=0
for t in $TARGETS; do
    case "$t" in
        aigrid) RUN_AIGRID=1 ;;
        etcd) RUN_ETCD=1 ;;
        *) echo "unknown target '$t' in TARGETS (expected aigrid and/or etcd)" >&2; exit 2 ;;
    esac
done
if [ "$RUN_AIGRID$RUN_ETCD" = "00" ]; then
    echo "TARGETS names no target" >&2
    exit 2
fi

log() { echo "==> $*" >&2; }
die() { echo "error: $*" >&2; exit 1; }

# ---------------------------------------------------------------- scratch + cleanup

WORK=""
PIDS=()
LOAD_PID=""

stop_pids() {
    local pid
    for pid in "$@"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "$@"; do
        # Give each process a few seconds to exit, then force it.
        for _ in $(seq 1 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -9 "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [ -n "$LOAD_PID" ]; then
        stop_pids "$LOAD_PID"
    fi
    if [ "${#PIDS[@]}" -gt 0 ]; then
        stop_pids "${PIDS[@]}"
    fi
    if [ -n "$WORK" ]; then
        if [ "${BENCH_KEEP_TMP:-0}" = "1" ] || [ "$rc" -ne 0 ]; then
            echo "scratch directory kept: $WORK" >&2
        else
            rm -rf "$WORK"
        fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- helpers

port_busy() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

require_free_port() {
    if port_busy "$1"; then
        die "port $1 on 127.0.0.1 is already in use"
    fi
}

# json_field LINE FIELD -> the raw value of a top-level number/string field.
json_field() {
    printf '%s\n' "$1" | sed -n "s/.*\"$2\":\"\{0,1\}\([^,\"}]*\)\"\{0,1\}[,}].*/\1/p"
}

# wait_until SECONDS DESCRIPTION PIDS... -- COMMAND...
# Retries COMMAND every 200 ms; fails if any PID dies or time runs out.
wait_until() {
    local secs="$1" what="$2"
    shift 2
    local pids=()
    while [ "$1" != "--" ]; do
        pids+=("$1")
        shift
    done
    shift
    local deadline=$((SECONDS + secs)) pid
    while true; do
        if "$@"; then
            return 0
        fi
        for pid in "${pids[@]}"; do
            kill -0 "$pid" 2>/dev/null || return 1
        done
        [ "$SECONDS" -lt "$deadline" ] || return 1
        sleep 0.2
    done
}

show_logs() {
    local f
    for f in "$@"; do
        [ -f "$f" ] || continue
        echo "----- last lines of $f" >&2
        tail -n 20 "$f" >&2
    done
}

declare -A RESULT

# run_load TARGET ENDPOINTS
run_load() {
    local target="$1" endpoints="$2" clients line ops errors
    for clients in $BENCH_CLIENTS; do
        log "$target: $clients client(s), ${BENCH_WARMUP_SECS}s warm-up + ${BENCH_SECS}s"
        # Run in the background and wait, so a signal interrupts the wait
        # and the cleanup trap runs at once.
        "$BIN_DIR/control_plane" --target "$target" --endpoints "$endpoints" \
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

# ---------------------------------------------------------------- build + install

if [ "${BENCH_SKIP_BUILD:-0}" != "1" ]; then
    packages=(-p aigrid-benchmarks)
    if [ "$RUN_AIGRID" = "1" ]; then
        packages=(-p aigrid "${packages[@]}")
    fi
    log "building ${packages[*]} (release)"
    (cd "$ROOT" && cargo build --release "${packages[@]}") || die "cargo build failed"
fi
[ -x "$BIN_DIR/control_plane" ] || die "$BIN_DIR/control_plane is missing"
if [ "$RUN_AIGRID" = "1" ]; then
    [ -x "$BIN_DIR/aigrid" ] || die "$BIN_DIR/aigrid is missing"
fi

if [ "$RUN_ETCD" = "1" ] && ! command -v etcd >/dev/null 2>&1; then
    log "etcd not found, installing etcd-server"
    SUDO=""
    if [ "$(id -u)" != "0" ]; then
        command -v sudo >/dev/null 2>&1 || die "etcd is missing and installing it needs root"
        SUDO="sudo"
    fi
    export DEBIAN_FRONTEND=noninteractive
    if ! $SUDO apt-get install -y etcd-server; then
        $SUDO apt-get update && $SUDO apt-get install -y etcd-server \
            || die "could not install etcd-server"
    fi
    command -v etcd >/dev/null 2>&1 || die "etcd-server installed but no etcd on PATH"
fi

WORK="$(mktemp -d "${BENCH_TMPDIR:-${TMPDIR:-/tmp}}/aigrid-bench.XXXXXX")"
fstype="$(stat -f -c %T "$WORK" 2>/dev/null || echo unknown)"
if [ "$fstype" = "tmpfs" ] || [ "$fstype" = "ramfs" ]; then
    log "warning: $WORK is on $fstype; fsync is free there, set BENCH_TMPDIR to a disk path"
fi
log "scratch directory $WORK ($fstype), ${BENCH_SECS}s per run, clients: $BENCH_CLIENTS"

# ---------------------------------------------------------------- aigrid

aigrid_has_leader() {
    local body
    body="$(curl -fsS --max-time 2 "http://127.0.0.1:$1/api/v1/cluster" 2>/dev/null)" || return 1
    printf '%s' "$body" | grep -q '"leader"' || return 1
    ! printf '%s' "$body" | grep -Eq '"leader"[[:space:]]*:[[:space:]]*null'
}

if [ "$RUN_AIGRID" = "1" ]; then
    ports=("$AIGRID_BASE_PORT" $((AIGRID_BASE_PORT + 1)) $((AIGRID_BASE_PORT + 2)))
    peers="1=127.0.0.1:${ports[0]},2=127.0.0.1:${ports[1]},3=127.0.0.1:${ports[2]}"
    endpoints="http://127.0.0.1:${ports[0]},http://127.0.0.1:${ports[1]},http://127.0.0.1:${ports[2]}"
    group=()
    logs=()
    for i in 1 2 3; do
        port="${ports[$((i - 1))]}"
        require_free_port "$port"
        mkdir -p "$WORK/aigrid$i"
        logs+=("$WORK/aigrid$i.log")
        "$BIN_DIR/aigrid" server --id "$i" --listen "127.0.0.1:$port" --peers "$peers" \
            --data-dir "$WORK/aigrid$i" >"$WORK/aigrid$i.log" 2>&1 &
        PIDS+=("$!")
        group+=("$!")
    done
    log "aigrid: waiting for a leader"
    for port in "${ports[@]}"; do
        if ! wait_until "$READY_TIMEOUT_SECS" "aigrid leader" "${group[@]}" -- aigrid_has_leader "$port"; then
            show_logs "${logs[@]}"
            die "aigrid node on port $port did not report a leader"
        fi
    done
    run_load aigrid "$endpoints"
    log "aigrid: stopping"
    stop_pids "${group[@]}"
    PIDS=()
fi

# ---------------------------------------------------------------- etcd

etcd_healthy() {
    curl -fsS --max-time 2 "http://127.0.0.1:$1/health" 2>/dev/null | grep -q '"health"[[:space:]]*:[[:space:]]*"true"'
}

if [ "$RUN_ETCD" = "1" ]; then
    cports=()
    pports=()
    initial=""
    endpoints=""
    for i in 1 2 3; do
        c=$((ETCD_BASE_PORT + 100 * i))
        p=$((c + 1))
        cports+=("$c")
        pports+=("$p")
        initial="${initial:+$initial,}e$i=http://127.0.0.1:$p"
        endpoints="${endpoints:+$endpoints,}http://127.0.0.1:$c"
    done
    group=()
    logs=()
    for i in 1 2 3; do
        c="${cports[$((i - 1))]}"
        p="${pports[$((i - 1))]}"
        require_free_port "$c"
        require_free_port "$p"
        logs+=("$WORK/etcd$i.log")
        # Default durability: etcd fsyncs its WAL before acknowledging a put.
        env -u ETCD_UNSAFE_NO_FSYNC etcd --name "e$i" --data-dir "$WORK/etcd$i" \
            --listen-client-urls "http://127.0.0.1:$c" \
            --advertise-client-urls "http://127.0.0.1:$c" \
            --listen-peer-urls "http://127.0.0.1:$p" \
            --initial-advertise-peer-urls "http://127.0.0.1:$p" \
            --initial-cluster "$initial" \
            --initial-cluster-token "aigrid-bench-$$" \
            --initial-cluster-state new \
            --logger zap --log-outputs stderr \
            >"$WORK/etcd$i.log" 2>&1 &
        PIDS+=("$!")
        group+=("$!")
    done
    log "etcd: waiting for a healthy cluster"
    for c in "${cports[@]}"; do
        if ! wait_until "$READY_TIMEOUT_SECS" "etcd health" "${group[@]}" -- etcd_healthy "$c"; then
            show_logs "${logs[@]}"
            die "etcd member on port $c did not become healthy"
        fi
    done
    run_load etcd "$endpoints"
    log "etcd: stopping"
    stop_pids "${group[@]}"
    PIDS=()
fi

# ---------------------------------------------------------------- report

val() { echo "${RESULT[$1]:--}"; }

echo
echo "Control-plane writes, 3 nodes on loopback, fsync on, ${BENCH_SECS}s per run ($(nproc) CPUs, scratch on $fstype)"
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
