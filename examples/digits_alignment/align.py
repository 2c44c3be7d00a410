"""Multimodal alignment: a projection from a frozen image encoder's features to the frozen MiniLM
text space, learned forward-only with an image-to-text contrastive loss.

The image encoder is an autoencoder pretrained by backprop on the digits' pixels alone (no labels)
in prepare.py, then frozen; its FEATURES-dimensional codes are the dataset's inputs. Each label is
the text "a handwritten digit <name>", embedded once by MiniLM on every worker. The target is the
projection W (384 × FEATURES); an image is retrieved to the label text of highest cosine.
"""
from torch import nn

from flops_dist.apps.targets import Projection
from flops_dist.apps.minilm import AlignmentLoss

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
LABEL_TEXTS = [f"a handwritten digit {name}" for name in NAMES]
FEATURES, TEXT_DIM = 16, 384

loss = AlignmentLoss(LABEL_TEXTS, temperature=0.02)


def build_projection():
    return Projection(FEATURES, TEXT_DIM, seed=0)


class AutoEncoder(nn.Module):
    """8×8 pixels → FEATURES-d code → pixels; the encoder half is the frozen image encoder."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, FEATURES))
        self.decoder = nn.Sequential(nn.Linear(FEATURES, 128), nn.GELU(), nn.Linear(128, 64))

    def forward(self, x):
        return self.decoder(self.encoder(x))
