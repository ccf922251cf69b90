#!/usr/bin/env bash
# Model serving benchmarks, one section per part, each printing its own markdown table:
#
#   embed      (a) all-MiniLM-L6-v2 embeddings per second on CPU, over aigrid's
#                  /v1/embeddings at batch 1 (1 and 32 clients) and batch 32, beside
#                  sentence-transformers (PyTorch CPU, as many threads as ours) encoding the same
#                  sentences (target/release/serving_embed, which runs
#                  benchmarks/serving/embed_baseline.py)
#   generate   (b) Llama (39 M parameters) generation tokens/s and time to first token at 1, 8 and
#                  32 concurrent streaming clients, continuous batching beside the same
#                  server decoding one sequence at a time (target/release/serving_generate)
#   llamacpp   (d) the model of (b) as one GGUF file (Q8_0, then F16) served by aigrid
#                  and by llama.cpp's OpenAI server (llama-cpp-python[server], built here
#                  from its source package on first use), same requests, 1, 8 and 32
#                  clients (target/release/serving_llamacpp)
#   coldstart  (c) deploy to first token with a ~190 MB model in the 4+2 store over 6
#                  links of 50 MiB/s, beside pulling it first and beside a whole-file
#                  download over one link (target/release/serving_coldstart)
#   zero       (e) `aigrid up`'s demo model scaled to zero: time from a request while
#                  it has no replica to the first token, beside the same model
#                  already running (target/release/serving_zero, driving
#                  target/release/aigrid)
#
# Examples:
#   benchmarks/serving/run.sh
#   BENCH_PARTS=generate SERVING_GENERATE_ARGS="--concurrency 1,16,64" benchmarks/serving/run.sh
#   BENCH_DEVICE=cuda:0 BENCH_PYTHON=python3 benchmarks/serving/run.sh   (embed and generate)
#
# Environment:
#   BENCH_DEVICE            cpu (default) or cuda:N: where embed and generate run ours
#                           and embed's baseline (the other parts are CPU-only); cuda:N
#                           builds with `--features cuda` (into target/cuda unless
#                           CARGO_TARGET_DIR says), through
#                           serving/fixtures/cuda-cargo.sh where nvcc is not on PATH
#   BENCH_PARTS             space-separated parts to run (default: embed generate llamacpp
#                           coldstart zero; embed generate with BENCH_DEVICE=cuda:N)
#   BENCH_SKIP_BUILD=1      use the binaries already in the target directory
#   BENCH_OUT               also append every table to this file
#   BENCH_PYTHON            a Python with sentence-transformers and torch, for the
#                           embed baseline (default /tmp/stenv/bin/python); make one with
#                             python3 -m venv V && V/bin/pip install "sentence-transformers[onnx]"
#                           (without the onnx extra the ONNX column stays empty)
#   BENCH_LLAMA_VENV        the virtualenv llama-cpp-python[server] is built into
#                           (default /tmp/llamacpp-venv; made when it lacks llama_cpp.server)
#   SERVING_LLAMACPP_ARGS   extra arguments for serving_llamacpp, e.g. "--types q8_0"
#   AIGRID_FIXTURES         where serving/fixtures/fetch.sh puts all-minilm-l6-v2
#                           (default <repo>/target/fixtures)
#   SERVING_EMBED_ARGS      extra arguments for serving_embed (see `serving_embed --help`)
#   SERVING_GENERATE_ARGS   extra arguments for serving_generate
#   SERVING_COLDSTART_ARGS  extra arguments for serving_coldstart, e.g. "--link-mib-s 100"
#   SERVING_ZERO_ARGS       extra arguments for serving_zero, e.g. "--reps 10"
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
case "$TARGET_DIR" in /*) ;; *) TARGET_DIR="$ROOT/$TARGET_DIR" ;; esac
DEVICE="${BENCH_DEVICE:-cpu}"
if [ "$DEVICE" = cpu ]; then
    PARTS="${BENCH_PARTS:-embed generate llamacpp coldstart zero}"
elif [[ "$DEVICE" =~ ^cuda:[0-9]+$ ]]; then
    PARTS="${BENCH_PARTS:-embed generate}"
    for part in $PARTS; do
        case "$part" in embed | generate) ;; *) echo "error: part '$part' runs on the CPU only" >&2; exit 2 ;; esac
    done
    export BENCH_FEATURES=cuda
    # Apart from the CPU build's binaries (other features, other flags).
    if [ -z "${CARGO_TARGET_DIR:-}" ]; then
        export CARGO_TARGET_DIR="$ROOT/target/cuda"
        TARGET_DIR="$CARGO_TARGET_DIR"
    fi
    if ! command -v nvcc >/dev/null; then
        export BENCH_CARGO="$ROOT/serving/fixtures/cuda-cargo.sh"
    fi
else
    echo "error: BENCH_DEVICE '$DEVICE': cpu or cuda:N" >&2
    exit 2
fi
# As `aigrid serve` does: candle's CPU thread count fixed to the cores (unset, candle
# reads /proc/cpuinfo on every matrix product).
export RAYON_NUM_THREADS="${RAYON_NUM_THREADS:-$(nproc)}"
PYTHON="${BENCH_PYTHON:-/tmp/stenv/bin/python}"
FIXTURES="${AIGRID_FIXTURES:-$ROOT/target/fixtures}"

# build, report, wants
. "$ROOT/benchmarks/parts.sh"

for part in $PARTS; do
    case "$part" in embed | generate | llamacpp | coldstart | zero) ;; *) echo "error: unknown part '$part'" >&2; exit 2 ;; esac
done

# ---- part (a): embeddings beside sentence-transformers ---------------------------
if wants embed; then
    echo "==> part (a): embeddings" >&2
    if ! "$PYTHON" -c 'import sentence_transformers, torch' 2>/dev/null; then
        cat >&2 <<EOF
error: $PYTHON cannot import sentence_transformers and torch, which the baseline needs.
Make such a Python and point BENCH_PYTHON at it:
    python3 -m venv /tmp/stenv && /tmp/stenv/bin/pip install sentence-transformers
    BENCH_PYTHON=/tmp/stenv/bin/python $0
EOF
        exit 1
    fi
    model="$FIXTURES/all-minilm-l6-v2"
    if [ ! -f "$model/model.safetensors" ]; then
        echo "==> fetching all-MiniLM-L6-v2 (serving/fixtures/fetch.sh model)" >&2
        AIGRID_FIXTURES="$FIXTURES" bash "$ROOT/serving/fixtures/fetch.sh" model >&2
    fi
    bin="$(build serving_embed)"
    # shellcheck disable=SC2086 # SERVING_EMBED_ARGS is a list of words
    report "$bin" --model "$model" --python "$PYTHON" --device "$DEVICE" \
        --baseline-script "$ROOT/benchmarks/serving/embed_baseline.py" ${SERVING_EMBED_ARGS:-}
fi

# ---- part (b): generation under concurrency ---------------------------------------
if wants generate; then
    echo "==> part (b): generation" >&2
    bin="$(build serving_generate)"
    # shellcheck disable=SC2086 # SERVING_GENERATE_ARGS is a list of words
    report "$bin" --device "$DEVICE" ${SERVING_GENERATE_ARGS:-}
fi

# ---- part (d): generation beside llama.cpp ------------------------------------------
if wants llamacpp; then
    echo "==> part (d): beside llama.cpp" >&2
    venv="${BENCH_LLAMA_VENV:-/tmp/llamacpp-venv}"
    if ! "$venv/bin/python" -c 'import llama_cpp.server.app' 2>/dev/null; then
        # PyPI carries llama-cpp-python as a source package only: pip builds
        # llama.cpp from it with CMake (for this CPU: GGML_NATIVE), which takes a
        # few minutes.
        echo "==> building llama-cpp-python[server] from source into $venv" >&2
        python3 -m venv "$venv" >&2
        "$venv/bin/pip" install --no-binary llama-cpp-python \
            'llama-cpp-python[server]==0.3.36' >&2
    fi
    bin="$(build serving_llamacpp)"
    # shellcheck disable=SC2086 # SERVING_LLAMACPP_ARGS is a list of words
    report "$bin" --python "$venv/bin/python" ${SERVING_LLAMACPP_ARGS:-}
fi

# ---- part (c): cold start to first token ------------------------------------------
if wants coldstart; then
    echo "==> part (c): cold start" >&2
    bin="$(build serving_coldstart)"
    # shellcheck disable=SC2086 # SERVING_COLDSTART_ARGS is a list of words
    report "$bin" ${SERVING_COLDSTART_ARGS:-}
fi

# ---- part (e): scale from zero to first token -------------------------------------
if wants zero; then
    echo "==> part (e): scale from zero" >&2
    if [ "${BENCH_SKIP_BUILD:-0}" != "1" ]; then
        echo "==> building aigrid (release)" >&2
        (cd "$ROOT" && cargo build --release -p aigrid --bin aigrid) >&2 \
            || { echo "error: cargo build failed" >&2; exit 1; }
    fi
    bin="$(build serving_zero)"
    # shellcheck disable=SC2086 # SERVING_ZERO_ARGS is a list of words
    report "$bin" --aigrid "$TARGET_DIR/release/aigrid" ${SERVING_ZERO_ARGS:-}
fi
