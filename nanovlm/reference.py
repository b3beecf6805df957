"""The PyTorch side of a parity check: one greedy run that records what the bundle is compared
with (image embeddings, the greedy tokens and the logits that chose each one)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from core.processors import Batch

from .vision_language_model import VisionLanguageModel


@torch.inference_mode()
def greedy_reference(
    model: VisionLanguageModel, batch: Batch, eos_token_id: int, max_new_tokens: int
) -> dict[str, Any]:
    """-> {"vision": [tiles, tokens, hidden] float32, "tokens": greedy ids, "logits": [steps, V] float32}
    for a batch of one prompt (steps = len(tokens): the logits before each chosen token)."""
    m = model
    ids = torch.from_numpy(batch.input_ids)
    mask = torch.from_numpy(batch.attention_mask)
    pixels = torch.from_numpy(batch.pixel_values)
    embeds = m.encode_images(pixels) if pixels.shape[0] else None
    merged, mask = m.merge_image_embeds(ids, embeds, mask)
    logits, state = m.prefill(merged, mask)
    tokens, steps = [], []
    for _ in range(max_new_tokens):
        steps.append(logits[0].float().numpy())
        token = int(logits[0].argmax())
        tokens.append(token)
        if token == eos_token_id or len(tokens) == max_new_tokens:
            break
        logits, state = m.decode_one_token(torch.tensor([token]), state)
    vision = embeds.float().numpy() if embeds is not None else np.zeros((0, 0, 0), np.float32)
    return {"vision": vision, "tokens": tokens, "logits": np.stack(steps)}
