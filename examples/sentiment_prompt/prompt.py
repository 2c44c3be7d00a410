"""Black-box prompt tuning of the frozen MiniLM encoder for tweet sentiment.

The prompt starts as the input embeddings of INIT_PROMPT and is placed after [CLS]. A tweet is
classified by the cosine of its prompted sentence embedding to the embeddings of LABEL_TEXTS.
Two targets: the soft prompt itself (p × 384 values) or a 32-dimensional code z mapped to the
prompt by a fixed random projection.
"""
from flops_dist.apps.targets import PromptCode, SoftPrompt
from flops_dist.apps.minilm import PromptClassifierLoss, word_embeddings

LABEL_TEXTS = ["a negative, unhappy message", "a positive, happy message"]
INIT_PROMPT = "the mood of this message:"
CODE_DIM = 32

loss = PromptClassifierLoss(LABEL_TEXTS, temperature=0.05)


def build_soft_prompt():
    return SoftPrompt(word_embeddings(INIT_PROMPT))


def build_prompt_code():
    return PromptCode(word_embeddings(INIT_PROMPT), code_dim=CODE_DIM, seed=0)
