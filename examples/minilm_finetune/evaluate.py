"""Held-out loss and accuracy of the zero-shot start and of a trained run's model.

    python examples/minilm_finetune/evaluate.py [RUN_DIR ...] [--split test]

RUN_DIR/model.safetensors is what `flops-dist train` writes; with no RUN_DIR only the zero-shot
model (build_model() as it is) is scored. Prints `SPLIT loss L, accuracy A` per model.
"""
import argparse
import os
import sys

import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file

from flops_dist.apps.minilm import classification_score

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from model import build_model  # noqa: E402


def load_split(path: str) -> tuple[torch.Tensor, torch.Tensor]:
    table = pq.read_table(path, columns=["tokens", "label"]).to_pydict()
    return torch.tensor(table["tokens"]), torch.tensor(table["label"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="*")
    parser.add_argument("--split", default="test", choices=("train", "validation", "test"))
    parser.add_argument("--data", default=os.path.join(HERE, "data"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    ids, labels = load_split(os.path.join(args.data, f"{args.split}.parquet"))
    model = build_model()
    loss, acc = classification_score(model, ids, labels)
    print(f"zero-shot: {args.split} loss {loss:.4f}, accuracy {acc:.4f}")
    for run_dir in args.run_dirs:
        model.load_state_dict(load_file(os.path.join(run_dir, "model.safetensors")))
        loss, acc = classification_score(model, ids, labels)
        print(f"{run_dir}: {args.split} loss {loss:.4f}, accuracy {acc:.4f}")


if __name__ == "__main__":
    main()
