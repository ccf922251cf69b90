# Shared by the control-plane benchmark scripts (run.sh, failover.sh): the
# environment they share, building and installing what they run, a scratch
# directory cleaned up on exit, and starting the 3-node aigrid cluster and the
# 3-member etcd cluster. Source it after `set -euo pipefail`.
#
# Environment (besides each script's own):
#   TARGETS             "aigrid etcd" (default), "aigrid" or "etcd" (space or comma separated)
#   BENCH_TMPDIR        parent of the scratch directory (default $TMPDIR or /tmp);
#                       must be a real disk, not tmpfs, or fsync costs nothing
#   BENCH_KEEP_TMP=1    keep the scratch directory (data and logs) afterwards
#   BENCH_SKIP_BUILD=1  use the binaries already in the target directory
#   BENCH_OUT           also append every JSON result line to this file
#   AIGRID_BASE_PORT    aigrid server N listens on BASE+N-1 (default 7701)
#   ETCD_BASE_PORT      etcd member N listens for clients on BASE+100*N and
#                       for peers on BASE+100*N+1 (default 22279 -> 22379/22380, ...)
#   READY_TIMEOUT_SECS  how long a cluster may take to elect a leader (default 60)
#   BENCH_TLS           1 (default): clients reach both systems over TLS and their
#                       members talk over mutual TLS (aigrid: --api-tls and its
#                       cluster CA; etcd: certificates from a CA made with openssl);
#                       0: plain HTTP for clients and etcd's peers (aigrid's Raft
#                       keeps mutual TLS, it has no plain mode)

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
case "$TARGET_DIR" in /*) ;; *) TARGET_DIR="$ROOT/$TARGET_DIR" ;; esac
BIN_DIR="$TARGET_DIR/release"

TARGETS="${TARGETS:-aigrid etcd}"
TARGETS="${TARGETS//,/ }"
AIGRID_BASE_PORT="${AIGRID_BASE_PORT:-7701}"
ETCD_BASE_PORT="${ETCD_BASE_PORT:-22279}"
READY_TIMEOUT_SECS="${READY_TIMEOUT_SECS:-60}"
BENCH_TLS="${BENCH_TLS:-1}"
case "$BENCH_TLS" in
    1) SCHEME=https ;;
    0) SCHEME=http ;;
    *) echo "BENCH_TLS must be 0 or 1, not '$BENCH_TLS'" >&2; exit 2 ;;
esac

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
FSTYPE=""
# Every server process still to stop and its log, and the load generator
# while it runs.
PIDS=()
SERVER_LOGS=()
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

# Stops every server started so far.
stop_servers() {
    if [ "${#PIDS[@]}" -gt 0 ]; then
        stop_pids "${PIDS[@]}"
    fi
    PIDS=()
    SERVER_LOGS=()
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [ -n "$LOAD_PID" ]; then
        stop_pids "$LOAD_PID"
    fi
    stop_servers
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

# Creates the scratch directory WORK, sets FSTYPE to its file system, and with
# BENCH_TLS makes the certificates (make_certs).
make_scratch() {
    WORK="$(mktemp -d "${BENCH_TMPDIR:-${TMPDIR:-/tmp}}/aigrid-bench.XXXXXX")"
    FSTYPE="$(stat -f -c %T "$WORK" 2>/dev/null || echo unknown)"
    if [ "$FSTYPE" = "tmpfs" ] || [ "$FSTYPE" = "ramfs" ]; then
        log "warning: $WORK is on $FSTYPE; fsync is free there, set BENCH_TMPDIR to a disk path"
    fi
    make_certs
}

# ---------------------------------------------------------------- TLS

# What clients trust (both CAs), and the load generator's arguments saying so.
TRUST_PEM=""
LOAD_TLS_ARGS=()
AIGRID_CA_DIR=""
ETCD_CERTS=""

# make_certs: aigrid's cluster CA (`aigrid ca init`; each server issues its own
# certificate from it at start) and, for etcd, a CA and one member certificate
# for 127.0.0.1, good as server and client (peer mutual TLS), made with openssl as
# etcd's own guide does.
make_certs() {
    [ "$BENCH_TLS" = "1" ] || return 0
    : >"$WORK/trust.pem"
    if [ "$RUN_AIGRID" = "1" ]; then
        AIGRID_CA_DIR="$WORK/aigrid-ca"
        "$BIN_DIR/aigrid" ca init --dir "$AIGRID_CA_DIR" >/dev/null || die "aigrid ca init failed"
        cat "$AIGRID_CA_DIR/ca.pem" >>"$WORK/trust.pem"
        LOAD_TLS_ARGS+=(--ca-cert "$AIGRID_CA_DIR/ca.pem")
        export AIGRID_CA_CERT="$AIGRID_CA_DIR/ca.pem"
    fi
    if [ "$RUN_ETCD" = "1" ]; then
        command -v openssl >/dev/null 2>&1 || die "BENCH_TLS=1 needs openssl for etcd's certificates"
        ETCD_CERTS="$WORK/etcd-certs"
        mkdir -p "$ETCD_CERTS"
        (
            cd "$ETCD_CERTS"
            openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
                -keyout ca.key -out ca.pem -days 2 -subj /CN=etcd-bench-ca
            openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
                -keyout member.key -out member.csr -subj /CN=etcd-member
            printf '%s\n' 'subjectAltName=IP:127.0.0.1,DNS:localhost' \
                'extendedKeyUsage=serverAuth,clientAuth' 'basicConstraints=CA:FALSE' \
                'keyUsage=digitalSignature,keyEncipherment' >member.ext
            openssl x509 -req -in member.csr -CA ca.pem -CAkey ca.key -CAcreateserial \
                -out member.pem -days 2 -extfile member.ext
        ) >/dev/null 2>&1 || die "making etcd's certificates with openssl failed"
        cat "$ETCD_CERTS/ca.pem" >>"$WORK/trust.pem"
        LOAD_TLS_ARGS+=(--ca-cert "$ETCD_CERTS/ca.pem")
    fi
    TRUST_PEM="$WORK/trust.pem"
}

# bcurl ARGS...: curl trusting both CAs under BENCH_TLS.
bcurl() {
    if [ -n "$TRUST_PEM" ]; then
        curl --cacert "$TRUST_PEM" "$@"
    else
        curl "$@"
    fi
}

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

# fail MESSAGE: dies after showing the servers' logs.
fail() {
    show_logs "${SERVER_LOGS[@]}"
    die "$1"
}

# await WHAT PIDS... -- COMMAND...: retries COMMAND until it succeeds; fails
# if one of PIDS dies or READY_TIMEOUT_SECS pass.
await() {
    local what="$1"
    shift
    wait_until "$READY_TIMEOUT_SECS" "$what" "$@" \
        || fail "$what: not within ${READY_TIMEOUT_SECS}s, or a server died"
}

# ---------------------------------------------------------------- build + install

# Builds aigrid (when it is a target) and the benchmark clients in release
# mode, and installs etcd-server with apt when etcd is a target and missing.
build_and_install() {
    if [ "${BENCH_SKIP_BUILD:-0}" != "1" ]; then
        local packages=(-p aigrid-benchmarks)
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
        local sudo=""
        if [ "$(id -u)" != "0" ]; then
            command -v sudo >/dev/null 2>&1 || die "etcd is missing and installing it needs root"
            sudo="sudo"
        fi
        export DEBIAN_FRONTEND=noninteractive
        if ! $sudo apt-get install -y etcd-server; then
            $sudo apt-get update && $sudo apt-get install -y etcd-server \
                || die "could not install etcd-server"
        fi
        command -v etcd >/dev/null 2>&1 || die "etcd-server installed but no etcd on PATH"
    fi
}

# ---------------------------------------------------------------- aigrid

aigrid_port() { echo $((AIGRID_BASE_PORT + $1 - 1)); }
# Each server's peer listener (Raft over mutual TLS), 50 ports above its API.
aigrid_peer_port() { echo $(($(aigrid_port "$1") + 50)); }

# aigrid_cluster PORT -> that server's GET /api/v1/cluster body.
aigrid_cluster() {
    bcurl -fsS --max-time 2 "$SCHEME://127.0.0.1:$1/api/v1/cluster" 2>/dev/null
}

# aigrid_leader ID -> the leader server ID names ("null" while there is none).
aigrid_leader() {
    json_field "$(aigrid_cluster "$(aigrid_port "$1")")" leader
}

aigrid_has_leader() {
    local body
    body="$(aigrid_cluster "$1")" || return 1
    printf '%s' "$body" | grep -q '"leader"' || return 1
    ! printf '%s' "$body" | grep -Eq '"leader"[[:space:]]*:[[:space:]]*null'
}

# start_aigrid_server DIR ID ARGS... starts server ID with its data and log in
# DIR; its pid is AIGRID_PIDS[ID].
declare -A AIGRID_PIDS
start_aigrid_server() {
    local dir="$1" id="$2"
    shift 2
    local port
    port="$(aigrid_port "$id")"
    require_free_port "$port"
    mkdir -p "$dir/aigrid$id"
    # Writes are signed: the load generator signs as this admin identity.
    if [ ! -f "$dir/admin.json" ]; then
        "$BIN_DIR/aigrid" key new --name bench --identity "$dir/admin.json" >/dev/null
    fi
    export AIGRID_IDENTITY="$dir/admin.json"
    local admin
    admin="$("$BIN_DIR/aigrid" key show --json --identity "$dir/admin.json" |
        python3 -c 'import json, sys; print(json.load(sys.stdin)["public_key"])')"
    require_free_port "$(aigrid_peer_port "$id")"
    # The cluster CA: servers issue their certificates from it. Raft is always over
    # mutual TLS; the API is HTTPS under BENCH_TLS.
    local ca="$AIGRID_CA_DIR" tls=()
    if [ -z "$ca" ]; then
        ca="$dir/ca"
        [[ -f "$ca/ca.key" ]] || "$BIN_DIR/aigrid" ca init --dir "$ca" >/dev/null
    fi
    [ "$BENCH_TLS" = "1" ] && tls=(--api-tls)
    "$BIN_DIR/aigrid" server --id "$id" --listen "127.0.0.1:$port" \
        --peer-listen "127.0.0.1:$(aigrid_peer_port "$id")" --ca-dir "$ca" "${tls[@]}" "$@" \
        --admin "bench=$admin" --data-dir "$dir/aigrid$id" >"$dir/aigrid$id.log" 2>&1 &
    PIDS+=("$!")
    SERVER_LOGS+=("$dir/aigrid$id.log")
    AIGRID_PIDS[$id]="$!"
}

# start_aigrid DIR ARGS... starts servers 1-3 with their data and logs in DIR
# and ARGS besides the usual, and waits until each names a leader; their URLs
# are in AIGRID_ENDPOINTS.
start_aigrid() {
    local dir="$1" id peers=""
    shift
    AIGRID_PIDS=()
    AIGRID_ENDPOINTS=""
    for id in 1 2 3; do
        peers="${peers:+$peers,}$id=127.0.0.1:$(aigrid_peer_port "$id")"
        AIGRID_ENDPOINTS="${AIGRID_ENDPOINTS:+$AIGRID_ENDPOINTS,}$SCHEME://127.0.0.1:$(aigrid_port "$id")"
    done
    for id in 1 2 3; do
        start_aigrid_server "$dir" "$id" --peers "$peers" "$@"
    done
    log "aigrid: waiting for a leader"
    for id in 1 2 3; do
        await "aigrid node on port $(aigrid_port "$id") reports a leader" "${PIDS[@]}" -- \
            aigrid_has_leader "$(aigrid_port "$id")"
    done
}

# ---------------------------------------------------------------- etcd

etcd_client_port() { echo $((ETCD_BASE_PORT + 100 * $1)); }
etcd_peer_port() { echo $((ETCD_BASE_PORT + 100 * $1 + 1)); }

etcd_healthy() {
    bcurl -fsS --max-time 2 "$SCHEME://127.0.0.1:$1/health" 2>/dev/null | grep -q '"health"[[:space:]]*:[[:space:]]*"true"'
}

# start_etcd_member DIR N INITIAL_CLUSTER STATE starts member eN with its data
# and log in DIR; its pid is ETCD_PIDS[N].
declare -A ETCD_PIDS
start_etcd_member() {
    local dir="$1" n="$2" initial="$3" state="$4" c p
    c="$(etcd_client_port "$n")"
    p="$(etcd_peer_port "$n")"
    require_free_port "$c"
    require_free_port "$p"
    # Clients over TLS; peers over mutual TLS (each must present a certificate from
    # the CA), as aigrid's servers do.
    local tls=()
    if [ "$BENCH_TLS" = "1" ]; then
        tls=(--cert-file "$ETCD_CERTS/member.pem" --key-file "$ETCD_CERTS/member.key"
            --peer-cert-file "$ETCD_CERTS/member.pem" --peer-key-file "$ETCD_CERTS/member.key"
            --peer-trusted-ca-file "$ETCD_CERTS/ca.pem" --peer-client-cert-auth)
    fi
    # Default durability: etcd fsyncs its WAL before acknowledging a put.
    env -u ETCD_UNSAFE_NO_FSYNC etcd --name "e$n" --data-dir "$dir/etcd$n" \
        --listen-client-urls "$SCHEME://127.0.0.1:$c" \
        --advertise-client-urls "$SCHEME://127.0.0.1:$c" \
        --listen-peer-urls "$SCHEME://127.0.0.1:$p" \
        --initial-advertise-peer-urls "$SCHEME://127.0.0.1:$p" \
        "${tls[@]}" \
        --initial-cluster "$initial" \
        --initial-cluster-token "aigrid-bench-$$" \
        --initial-cluster-state "$state" \
        --logger zap --log-outputs stderr \
        >"$dir/etcd$n.log" 2>&1 &
    PIDS+=("$!")
    SERVER_LOGS+=("$dir/etcd$n.log")
    ETCD_PIDS[$n]="$!"
}

# start_etcd DIR starts members e1-e3 with their data and logs in DIR and waits
# until each is healthy; their client URLs are in ETCD_ENDPOINTS and the
# initial cluster in ETCD_INITIAL.
start_etcd() {
    local dir="$1" n
    mkdir -p "$dir"
    ETCD_PIDS=()
    ETCD_INITIAL=""
    ETCD_ENDPOINTS=""
    for n in 1 2 3; do
        ETCD_INITIAL="${ETCD_INITIAL:+$ETCD_INITIAL,}e$n=$SCHEME://127.0.0.1:$(etcd_peer_port "$n")"
        ETCD_ENDPOINTS="${ETCD_ENDPOINTS:+$ETCD_ENDPOINTS,}$SCHEME://127.0.0.1:$(etcd_client_port "$n")"
    done
    for n in 1 2 3; do
        start_etcd_member "$dir" "$n" "$ETCD_INITIAL" new
    done
    log "etcd: waiting for a healthy cluster"
    for n in 1 2 3; do
        await "etcd member on port $(etcd_client_port "$n") is healthy" "${PIDS[@]}" -- \
            etcd_healthy "$(etcd_client_port "$n")"
    done
}
