#!/usr/bin/env bash
# Model store benchmarks, one section per part, each printing its own markdown table:
#
#   codec  (a) Reed-Solomon erasure coding throughput: aigrid's Codec beside
#              reed-solomon-erasure used raw and reed-solomon-simd, 1 and 2 threads,
#              with memcpy as the ceiling (target/release/store_codec)
#   push   (b) push pipeline: Store::push (4+2, 4 MiB chunks) into 6 local directories
#              of a ~1 GiB model, beside std::fs::copy (target/release/store_load)
#   load   (c) cold load of that model from 6 backends, each behind its own
#              100 MiB/s link, beside a whole-file download from one such backend
#              (target/release/store_load; push and load share one run)
#
# Examples:
#   benchmarks/store/run.sh
#   BENCH_PARTS=codec STORE_CODEC_ARGS="--shard-kib 256,1024,4096 --reps 5" benchmarks/store/run.sh
#
# Environment:
#   BENCH_PARTS         space-separated parts to run (default: every written part)
#   BENCH_SKIP_BUILD=1  use the binaries already in the target directory
#   BENCH_OUT           also append every table to this file
#   STORE_CODEC_ARGS    extra arguments for store_codec (see `store_codec --help`)
#   STORE_LOAD_ARGS     extra arguments for store_load (see `store_load --help`), e.g.
#                       "--push-reps 5 --load-reps 5 --link-mib-s 50"
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
case "$TARGET_DIR" in /*) ;; *) TARGET_DIR="$ROOT/$TARGET_DIR" ;; esac
PARTS="${BENCH_PARTS:-codec push load}"

# build, report, wants
. "$ROOT/benchmarks/parts.sh"

for part in $PARTS; do
    case "$part" in codec | push | load) ;; *) echo "error: unknown part '$part'" >&2; exit 2 ;; esac
done

# ---- part (a): erasure coding throughput -------------------------------------
if wants codec; then
    echo "==> part (a): erasure coding throughput" >&2
    bin="$(build store_codec)"
    # shellcheck disable=SC2086 # STORE_CODEC_ARGS is a list of words
    report "$bin" ${STORE_CODEC_ARGS:-}
fi

# ---- parts (b) and (c): push pipeline and cold load ----------------------------
# One store_load run serves both parts: the cold load reads the shards the push
# wrote (with only `load`, it pushes once untimed).
store_load_parts=()
if wants push; then store_load_parts+=(push); fi
if wants load; then store_load_parts+=(load); fi
if [ "${#store_load_parts[@]}" -gt 0 ]; then
    echo "==> parts (b)/(c): ${store_load_parts[*]}" >&2
    bin="$(build store_load)"
    # shellcheck disable=SC2086 # STORE_LOAD_ARGS is a list of words
    report "$bin" --parts "$(IFS=,; echo "${store_load_parts[*]}")" ${STORE_LOAD_ARGS:-}
fi
