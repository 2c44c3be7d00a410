"""Held-out loss and accuracy of the zero-shot prompt and of trained runs' prompts.

    python examples/sentiment_prompt/evaluate.py [RUN_DIR ...] [--split test]

RUN_DIR/model.safetensors is what `flops-dist train` writes (a prompt code or a soft prompt; which
one is read from its keys). The zero-shot prompt is the same for both targets (z = 0 is the
initial prompt). Prints `SPLIT loss L, accuracy A` per model; --split other_topic scores the
Apple tweets, a topic neither training nor tuning saw (prepare.py).
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
import prompt  # noqa: E402


def score(target: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of the prompted classifier over a split."""
    return classification_score(lambda x: prompt.loss.scores(target(x), x), ids, labels, chunk=100)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="*")
    parser.add_argument("--split", default="test", choices=("train", "validation", "test", "other_topic"))
    parser.add_argument("--data", default=os.path.join(HERE, "data"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    table = pq.read_table(os.path.join(args.data, f"tweets_{args.split}.parquet"), columns=["tokens", "label"])
    ids, labels = torch.tensor(table["tokens"].to_pylist()).long(), torch.tensor(table["label"].to_pylist())
    prompt.loss.ensure_loaded(torch.device("cpu"))
    print(f"zero-shot: {args.split} loss {{:.4f}}, accuracy {{:.4f}}".format(*score(prompt.build_prompt_code(), ids, labels)))
    for run_dir in args.run_dirs:
        state = load_file(os.path.join(run_dir, "model.safetensors"))
        target = prompt.build_prompt_code() if "code" in state else prompt.build_soft_prompt()
        target.load_state_dict(state)
        print(f"{run_dir}: {args.split} loss {{:.4f}}, accuracy {{:.4f}}".format(*score(target, ids, labels)))


if __name__ == "__main__":
    main()
