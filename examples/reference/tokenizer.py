"""A small fixed tokenizer for the attribute prompts of the reference model.

Words map to ids in a fixed vocabulary; ids map to vectors through an embedding table that
is trained with the model and saved in the same safetensors file (``prompt_embedding.weight``).
Every prompt becomes ``(MAX_TOKENS, text_dim)``, padded with the ``<pad>`` vector; the empty
prompt (all ``<pad>``) is the null embedding for classifier-free guidance.
"""
from __future__ import annotations

import torch
from torch import nn

from .data import COLOURS, SHAPES, MOTIONS, DIRECTIONS, SPEEDS

VOCAB: tuple[str, ...] = ("<pad>",) + tuple(COLOURS) + SHAPES + MOTIONS + tuple(DIRECTIONS) + tuple(SPEEDS)
MAX_TOKENS = 8
STOPWORDS = {"a", "an", "the", "is", "and", ",", "."}


def tokenize(prompt: str) -> list[int]:
    """Prompt -> MAX_TOKENS ids (padded with 0). Unknown words raise ValueError."""
    ids = []
    for w in prompt.lower().replace(",", " ").split():
        if w in STOPWORDS:
            continue
        if w not in VOCAB:
            raise ValueError(f"unknown word {w!r}; vocabulary: {' '.join(VOCAB[1:])}")
        ids.append(VOCAB.index(w))
    if len(ids) > MAX_TOKENS:
        raise ValueError(f"prompt longer than {MAX_TOKENS} words: {prompt!r}")
    return ids + [0] * (MAX_TOKENS - len(ids))


class PromptTokenizer(nn.Module):
    """``tokenizer(["red circle moving right fast", ""])`` -> ``(B, MAX_TOKENS, text_dim)``."""

    def __init__(self, text_dim: int = 32):
        super().__init__()
        self.text_dim = text_dim
        self.prompt_embedding = nn.Embedding(len(VOCAB), text_dim)
        nn.init.normal_(self.prompt_embedding.weight, std=1.0)

    @staticmethod
    def ids(prompts) -> torch.Tensor:
        if isinstance(prompts, str):
            prompts = [prompts]
        return torch.tensor([tokenize(p) for p in prompts], dtype=torch.long)

    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return self.prompt_embedding(ids)

    def forward(self, prompts) -> torch.Tensor:
        return self.embed_ids(self.ids(prompts).to(self.prompt_embedding.weight.device))
