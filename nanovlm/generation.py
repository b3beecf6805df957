"""Token selection for the PyTorch reference, with the same meaning as core/sampling.py: repetition
penalty, temperature, top-k, top-p, in that order, on torch tensors (on the model's device)."""

from __future__ import annotations

import torch

from core.sampling import SamplingConfig


def penalize(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits [B, V], seen [B, T] token ids -> logits with the CTRL / transformers penalty applied."""
    vals = logits.gather(-1, seen)
    return logits.scatter(-1, seen, torch.where(vals > 0, vals / penalty, vals * penalty))


def probabilities(logits: torch.Tensor, config: SamplingConfig) -> torch.Tensor:
    """logits [B, V] -> the distribution sampled from [B, V]: / temperature, top-k, top-p, softmax."""
    logits = logits.double() / config.temperature
    if config.top_k and config.top_k < logits.shape[-1]:
        kth = torch.topk(logits, config.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if config.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True, dim=-1, stable=True)
        drop_sorted = (sorted_p.cumsum(-1) - sorted_p) >= config.top_p  # the most likely token stays
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample(
    logits: torch.Tensor,
    config: SamplingConfig,
    seen: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits [B, V] -> next token ids [B]; `seen` [B, T] holds the tokens for the repetition penalty."""
    if config.repetition_penalty != 1.0 and seen is not None and seen.numel():
        logits = penalize(logits.float(), seen, config.repetition_penalty)
    if config.greedy:
        return logits.argmax(-1)
    return torch.multinomial(probabilities(logits, config).float(), 1, generator=generator).squeeze(-1)
