import os

import pytest
import torch

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# One thread: results must not depend on the core count, and on a loaded 2-core machine
# OpenMP contention makes small ops orders of magnitude slower.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
    """The digits example's Parquet splits and pretrained ViT, made once per session."""
    import subprocess
    import sys
    from pathlib import Path
    out = tmp_path_factory.mktemp("digits")
    script = Path(__file__).resolve().parents[1] / "examples" / "digits" / "prepare.py"
    subprocess.run([sys.executable, str(script), str(out)], check=True, capture_output=True)
    return out
