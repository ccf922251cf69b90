# Shared by the benchmark scripts (store/run.sh and serving/run.sh run in parts;
# fanout/run.sh is one). Source it after setting ROOT, TARGET_DIR (and PARTS).

# Builds one benchmark binary in release mode (unless BENCH_SKIP_BUILD=1), with
# the cargo features BENCH_FEATURES names through BENCH_CARGO (default cargo), and
# prints its path.
build() {
    local bin="$TARGET_DIR/release/$1"
    if [ "${BENCH_SKIP_BUILD:-0}" != "1" ]; then
        echo "==> building $1 (release${BENCH_FEATURES:+, features $BENCH_FEATURES})" >&2
        # shellcheck disable=SC2086 # BENCH_CARGO is a command and its words
        (cd "$ROOT" && ${BENCH_CARGO:-cargo} build --release -p aigrid-benchmarks \
            ${BENCH_FEATURES:+--features "$BENCH_FEATURES"} --bin "$1") >&2 \
            || { echo "error: cargo build failed" >&2; exit 1; }
    fi
    [ -x "$bin" ] || { echo "error: $bin is missing" >&2; exit 1; }
    echo "$bin"
}

# Runs a command, copying its stdout to BENCH_OUT when set.
report() {
    if [ -n "${BENCH_OUT:-}" ]; then
        "$@" | tee -a "$BENCH_OUT"
    else
        "$@"
    fi
}

# Whether PARTS names this part.
wants() { case " $PARTS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
