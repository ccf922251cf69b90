#!/usr/bin/env python3
"""The baseline of the serving benchmark's part (a): sentence-transformers (PyTorch,
CPU) encoding the same sentences as aigrid's server, timed in-process.

Run by target/release/serving_embed, which writes the sentences and reads what this
prints; by hand:

    python embed_baseline.py --model DIR --sentences FILE.json [--batch-sizes 1,32]
        [--reps 3] [--threads 2] [--check 16]

Prints one JSON object on stdout: versions, the thread count, for each batch size the
wall seconds of each repetition of `SentenceTransformer.encode(sentences,
batch_size=B)`, and the embeddings of the first --check sentences (for the cosine
check on the Rust side). The model is loaded from DIR only; the hub is never
contacted.

Needs a Python with sentence-transformers and torch; make one with

    python3 -m venv V && V/bin/pip install sentence-transformers
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
    args = parser.parse_args()

    import sentence_transformers
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(args.threads)
    with open(args.sentences, encoding="utf-8") as f:
        sentences = json.load(f)
    model = SentenceTransformer(args.model, device="cpu")
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]

    def encode(batch_size: int, items=sentences):
        return model.encode(items, batch_size=batch_size, show_progress_bar=False)

    # Warm-up: first calls allocate and pick kernels.
    encode(max(batch_sizes), sentences[:64])
    encode(1, sentences[:8])

    results = []
    for batch_size in batch_sizes:
        seconds = []
        for rep in range(args.reps):
            start = time.perf_counter()
            vectors = encode(batch_size)
            seconds.append(time.perf_counter() - start)
            assert len(vectors) == len(sentences)
            print(
                f"    sentence-transformers batch_size={batch_size} rep {rep + 1}/{args.reps}: "
                f"{seconds[-1]:.3f} s",
                file=sys.stderr,
            )
        results.append({"batch_size": batch_size, "seconds": seconds})

    check = encode(1, sentences[: args.check])
    json.dump(
        {
            "sentence_transformers": sentence_transformers.__version__,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "results": results,
            "embeddings": [[float(x) for x in v] for v in check],
        },
        sys.stdout,
    )
    print()


if __name__ == "__main__":
    main()
