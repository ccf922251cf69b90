#!/usr/bin/env python3
"""Writes random weights into a BERT model directory whose real weights cannot reach
the machine that runs the benchmark (a lent GPU machine with no network, say):
model.safetensors with every tensor transformers' BertModel has for the directory's
config.json, initialised as BertModel initialises them, from seed 0. The time of a
forward pass does not depend on the weights' values, and part (a) still checks our
vectors against sentence-transformers' over the same file.

    python random_weights.py DIR    (DIR holds config.json and the tokenizer files)
"""

import sys

import torch
from safetensors.torch import save_file
from transformers import BertConfig, BertModel


def main() -> None:
    directory = sys.argv[1]
    torch.manual_seed(0)
    model = BertModel(BertConfig.from_json_file(f"{directory}/config.json"))
    tensors = {name: t.contiguous() for name, t in model.state_dict().items()}
    save_file(tensors, f"{directory}/model.safetensors")
    print(f"{directory}/model.safetensors: {len(tensors)} random tensors", file=sys.stderr)


if __name__ == "__main__":
    main()
