"""Shared setup for the benchmarks: the digits example's data, model and config."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "digits"
OUT = ROOT / "bench" / "out"


def digits_data() -> Path:
    """The prepared digits splits and pretrained ViT (made once, under bench/out/digits)."""
    data = OUT / "digits"
    if not (data / "digits_vit_pretrained.safetensors").exists():
        subprocess.run([sys.executable, str(EXAMPLE / "prepare.py"), str(data)], check=True)
    return data


def digits_config(**overrides):
    """The main job's config with its data under bench/out, plus `section.field` overrides."""
    from flops_dist.config import Config
    import tomllib
    raw = tomllib.loads((EXAMPLE / "digits.toml").read_text())
    data = digits_data()
    raw["model"]["weights"] = str(data / "digits_vit_pretrained.safetensors")
    raw["data"]["train"] = str(data / "digits_train.parquet")
    raw["data"]["test"] = str(data / "digits_test.parquet")
    for key, value in overrides.items():
        section, name = key.split("__")
        raw.setdefault(section, {})[name] = value
    return Config.from_dict(raw, EXAMPLE)
