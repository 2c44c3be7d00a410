"""Build the alignment example's data: digits through a frozen image encoder pretrained here.

    python examples/digits_alignment/prepare.py OUT_DIR [--no-reference]

1. Splits scikit-learn's digits as the digits example does (1,197 train / 600 test, seed 0).
2. Pretrains an autoencoder by backprop on the training pixels only (no labels), then freezes it.
3. Writes the encoder's codes, standardised with the training set's mean and spread, as
   align_train.parquet / align_test.parquet (`features`: FEATURES floats, `label`: the digit), and
   the encoder as image_encoder.safetensors.
4. As a reference, trains the same projection by backprop with the same contrastive loss and prints
   its held-out retrieval accuracy: what forward-only training can at best approach (skipped with
   --no-reference).
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
from align import FEATURES, AutoEncoder, build_projection, loss  # noqa: E402

N_TRAIN = 1197


def split():
    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int64)
    perm = np.random.default_rng(0).permutation(len(y))
    return (x[perm[:N_TRAIN]], y[perm[:N_TRAIN]]), (x[perm[N_TRAIN:]], y[perm[N_TRAIN:]])


def pretrain_encoder(x, epochs=150, batch=64):
    torch.manual_seed(0)
    ae = AutoEncoder()
    opt = torch.optim.Adam(ae.parameters(), lr=3e-3)
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(batch):
            err = ((ae(x[idx]) - x[idx]) ** 2).mean()
            opt.zero_grad()
            err.backward()
            opt.step()
    with torch.no_grad():
        return ae.eval(), float(((ae(x) - x) ** 2).mean())


def backprop_reference(f_train, y_train, f_test, y_test, steps=2000):
    """The projection trained by backprop: an upper reference for the forward-only run."""
    loss.ensure_loaded(torch.device("cpu"))
    proj = build_projection()
    opt = torch.optim.Adam(proj.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(len(y_train), (32,), generator=gen)
        out = loss(proj(f_train[idx]), f_train[idx], y_train[idx])[0].mean()
        opt.zero_grad()
        out.backward()
        opt.step()
    with torch.no_grad():
        return float((loss.scores(proj(f_test), f_test).argmax(-1) == y_test).float().mean())


def write(path, features, labels):
    col = pa.FixedSizeListArray.from_arrays(pa.array(features.reshape(-1), pa.float32()), FEATURES)
    pq.write_table(pa.table({"features": col, "label": pa.array(labels, pa.int64())}), path)


def main(out_dir, reference=True):
    torch.set_num_threads(1)
    os.makedirs(out_dir, exist_ok=True)
    (xtr, ytr), (xte, yte) = split()
    began = time.perf_counter()
    ae, err = pretrain_encoder(torch.from_numpy(xtr))
    for p in ae.parameters():
        p.requires_grad_(False)
    save_file(ae.encoder.state_dict(), os.path.join(out_dir, "image_encoder.safetensors"))
    with torch.no_grad():
        ctr, cte = ae.encoder(torch.from_numpy(xtr)).numpy(), ae.encoder(torch.from_numpy(xte)).numpy()
    mean, spread = ctr.mean(0), ctr.std(0) + 1e-6
    ftr, fte = (ctr - mean) / spread, (cte - mean) / spread
    write(os.path.join(out_dir, "align_train.parquet"), ftr, ytr)
    write(os.path.join(out_dir, "align_test.parquet"), fte, yte)
    print(f"image encoder pretrained by backprop (autoencoder, {FEATURES}-d code) in "
          f"{time.perf_counter() - began:.1f}s; reconstruction MSE {err:.4f}")
    if not reference:
        return
    ref = backprop_reference(torch.from_numpy(ftr), torch.from_numpy(ytr), torch.from_numpy(fte), torch.from_numpy(yte))
    print(f"reference: the projection trained by backprop retrieves {ref:.3f} of the held-out images")


if __name__ == "__main__":
    args = sys.argv[1:]
    if len(args) not in (1, 2) or args[1:] not in ([], ["--no-reference"]):
        sys.exit(__doc__)
    main(args[0], reference=args[1:] != ["--no-reference"])
