import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# One thread: results must not depend on the core count, and on a loaded 2-core machine
# OpenMP contention makes small ops orders of magnitude slower.
torch.set_num_threads(1)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
    """The digits example's Parquet splits and pretrained ViT, made once per session."""
    out = tmp_path_factory.mktemp("digits")
    script = EXAMPLES / "digits" / "prepare.py"
    subprocess.run([sys.executable, str(script), str(out)], check=True, capture_output=True)
    return out


def _prepare(tmp_path_factory, example: str, *args: str):
    """A copy of an example with its data prepared, as a user would lay it out."""
    job = tmp_path_factory.mktemp(example) / "job"
    shutil.copytree(EXAMPLES / example, job, ignore=shutil.ignore_patterns("data"))
    out = subprocess.run([sys.executable, str(job / "prepare.py"), str(job / "data"), *args],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return job


@pytest.fixture(scope="session")
def tweets(tmp_path_factory):
    """The prompt-tuning example with a small tokenized subset (32 train and 16 validation airline
    tweets, 16 test airline tweets, 16 other_topic Apple tweets)."""
    return _prepare(tmp_path_factory, "sentiment_prompt", "--train", "32", "--validation", "16", "--test", "16",
                    "--other-topic", "16")


@pytest.fixture(scope="session")
def alignment(tmp_path_factory):
    """The alignment example with its frozen image encoder's features."""
    return _prepare(tmp_path_factory, "digits_alignment", "--no-reference")


@pytest.fixture(scope="session")
def minilm_job(tmp_path_factory):
    """The MiniLM fine-tuning example with a tiny subset: 32 train, 8 validation, 32 test tweets of
    16 tokens."""
    return _prepare(tmp_path_factory, "minilm_finetune", "--train", "32", "--validation", "8", "--test", "32",
                    "--max-tokens", "16")
