"""Build the digits example's data and its pretrained starting point.

    python examples/digits/prepare.py OUT_DIR

Writes digits_train.parquet / digits_test.parquet (1,197 / 600 examples) and
digits_vit_pretrained.safetensors: a TinyViT trained by backprop on the train
digits 0-4 only, so forward-only fine-tuning starts at about 50% on all ten.
"""
import os
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import save_file
from sklearn.datasets import load_digits

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from model import build_model, per_example_cross_entropy  # noqa: E402

N_TRAIN = 1197


def split():
    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int64)
    perm = np.random.default_rng(0).permutation(len(y))
    tr, te = perm[:N_TRAIN], perm[N_TRAIN:]
    return (x[tr], y[tr]), (x[te], y[te])


def write_parquet(path, x, y):
    pixels = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1), pa.float32()), 64)
    pq.write_table(pa.table({"pixels": pixels, "label": pa.array(y, pa.int64())}), path)


def accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(-1) == y).float().mean().item()


def pretrain(x, y, epochs=40, batch=64):
    torch.manual_seed(0)
    model = build_model()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        for idx in torch.randperm(len(y)).split(batch):
            loss = per_example_cross_entropy(model(x[idx]), y[idx]).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def main(out_dir):
    torch.set_num_threads(1)  # reproducible bits: reductions depend on the thread count
    os.makedirs(out_dir, exist_ok=True)
    (xtr, ytr), (xte, yte) = split()
    write_parquet(os.path.join(out_dir, "digits_train.parquet"), xtr, ytr)
    write_parquet(os.path.join(out_dir, "digits_test.parquet"), xte, yte)

    # A related task (digits 0-4) so the ten-class fine-tune starts mid-way, not from scratch.
    keep = ytr < 5
    t0 = time.perf_counter()
    model = pretrain(torch.from_numpy(xtr[keep]), torch.from_numpy(ytr[keep]))
    seconds = time.perf_counter() - t0
    save_file(model.state_dict(), os.path.join(out_dir, "digits_vit_pretrained.safetensors"))

    xt, yt = torch.from_numpy(xte), torch.from_numpy(yte)
    low = yt < 5
    print(f"pretrained in {seconds:.1f}s on {int(keep.sum())} examples (digits 0-4)")
    print(f"test accuracy: all classes {accuracy(model, xt, yt):.3f}, "
          f"digits 0-4 {accuracy(model, xt[low], yt[low]):.3f}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
