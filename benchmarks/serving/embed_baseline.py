#!/usr/bin/env python3
"""The baseline of the serving benchmark's part (a): sentence-transformers (PyTorch,
on the CPU or a GPU) encoding the same sentences as aigrid's server, timed in-process.

Run by target/release/serving_embed, which writes the sentences and reads what this
prints; by hand:

    python embed_baseline.py --model DIR --sentences FILE.json [--batch-sizes 1,32]
        [--reps 3] [--threads 2] [--check 16] [--device cpu|cuda:N]

Prints one JSON object on stdout: versions, the thread count, for each batch size the
wall seconds of each repetition of `SentenceTransformer.encode(sentences,
batch_size=B)` (`results`, PyTorch's default f32) and of the same call under
`torch.autocast("cpu", dtype=torch.bfloat16)` (`results_bf16`, bf16 products as on the
CPU's AMX units; empty with --no-bf16; on a GPU the model's weights converted with
`.to(torch.bfloat16)` instead, as a bf16 model runs there, and `bf16` says which), of
the same call with sentence-transformers'
ONNX backend (`results_onnx`: the model exported by optimum into a copy of DIR and
run by onnxruntime on CPU with --threads intra-op threads; empty with --no-onnx or
when onnxruntime and optimum are missing, `onnx_error` then says why), and the f32
embeddings of the first --check sentences (for the cosine check on the Rust side). The model is loaded from DIR only; the hub is never
contacted.

Needs a Python with sentence-transformers and torch (and for the ONNX column
onnxruntime and optimum); make one with

    python3 -m venv V && V/bin/pip install sentence-transformers onnxruntime "optimum[onnxruntime]"
"""

import argparse
import json
import os
import sys
import time

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="the model directory")
    parser.add_argument("--sentences", required=True, help="a JSON list of strings")
    parser.add_argument("--batch-sizes", default="1,32")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--check", type=int, default=16)
    parser.add_argument("--no-bf16", action="store_true", help="skip the autocast runs")
    parser.add_argument("--no-onnx", action="store_true", help="skip the ONNX backend")
    parser.add_argument("--device", default="cpu", help="cpu or cuda:N")
    args = parser.parse_args()

    import sentence_transformers
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(args.threads)
    with open(args.sentences, encoding="utf-8") as f:
        sentences = json.load(f)
    gpu = args.device.startswith("cuda")
    model = SentenceTransformer(args.model, device=args.device)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]

    def encode(batch_size: int, items=sentences, using=None):
        return (using or model).encode(items, batch_size=batch_size, show_progress_bar=False)

    def timed(label: str, using=None):
        # Warm-up: first calls allocate and pick kernels.
        encode(max(batch_sizes), sentences[:64], using)
        encode(1, sentences[:8], using)
        results = []
        for batch_size in batch_sizes:
            seconds = []
            for rep in range(args.reps):
                start = time.perf_counter()
                vectors = encode(batch_size, using=using)
                seconds.append(time.perf_counter() - start)
                assert len(vectors) == len(sentences)
                print(
                    f"    sentence-transformers{label} batch_size={batch_size} "
                    f"rep {rep + 1}/{args.reps}: {seconds[-1]:.3f} s",
                    file=sys.stderr,
                )
            results.append({"batch_size": batch_size, "seconds": seconds})
        return results

    results = timed("")
    check = encode(1, sentences[: args.check])
    results_bf16, bf16 = [], None
    if not args.no_bf16 and gpu:
        # encode() returns host arrays: every call waits for the GPU.
        bf16 = "weights"
        results_bf16 = timed(" (bf16 weights)", model.to(torch.bfloat16))
    elif not args.no_bf16:
        bf16 = "autocast"
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results_bf16 = timed(" (autocast bf16)")

    results_onnx, onnx_versions, onnx_error = [], {}, None
    if not args.no_onnx:
        try:
            import shutil
            import tempfile

            from importlib.metadata import version

            import onnxruntime

            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = args.threads
            options.inter_op_num_threads = 1
            with tempfile.TemporaryDirectory() as copy:
                shutil.copytree(args.model, copy, dirs_exist_ok=True)
                onnx_model = SentenceTransformer(
                    copy,
                    device="cpu",
                    backend="onnx",
                    model_kwargs={
                        "provider": "CPUExecutionProvider",
                        "session_options": options,
                        "export": True,
                    },
                )
                results_onnx = timed(" (ONNX)", onnx_model)
            onnx_versions = {
                "onnxruntime": onnxruntime.__version__,
                "optimum": version("optimum"),
            }
        except Exception as e:  # the column is left empty, and why is said
            onnx_error = f"{type(e).__name__}: {e}"
            print(f"    ONNX backend not run: {onnx_error}", file=sys.stderr)

    json.dump(
        {
            "sentence_transformers": sentence_transformers.__version__,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "bf16": bf16,
            "results": results,
            "results_bf16": results_bf16,
            "results_onnx": results_onnx,
            "onnx_versions": onnx_versions,
            "onnx_error": onnx_error,
            "embeddings": [[float(x) for x in v] for v in check],
        },
        sys.stdout,
    )
    print()


if __name__ == "__main__":
    main()
