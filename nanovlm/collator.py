"""Turn (images, conversation) samples into padded training batches with assistant-only labels."""

from __future__ import annotations

import logging

import numpy as np
import torch

from core.config import VLMConfig
from core.conversations import Conversation
from core.processors import ImageProcessor, Tokenizer, image_string, render_chat

log = logging.getLogger(__name__)


def encode_conversation(
    cfg: VLMConfig, tokenizer: Tokenizer, grids: list[tuple[int, int]], turns: list[tuple[str, str]]
) -> tuple[list[int], list[bool]]:
    """Token ids of the whole chat and, per token, whether it is assistant output to learn.

    The chat is tokenized message by message; every message starts with a special token, so this
    equals tokenizing the rendered chat at once. Learnt: each answer and its end-of-turn token.
    """
    template = cfg.lm_chat_template
    img = image_string(grids, cfg) if grids else ""
    messages: list[dict[str, str]] = []
    ids: list[int] = []
    learn: list[bool] = []
    done = ""
    for i, (question, answer) in enumerate(turns):
        messages.append({"role": "user", "content": (img if i == 0 else "") + question})
        prompt = render_chat(template, messages, add_generation_prompt=True)
        piece = tokenizer.encode(prompt[len(done) :])
        ids += piece
        learn += [False] * len(piece)
        messages.append({"role": "assistant", "content": answer})
        full = render_chat(template, messages, add_generation_prompt=False)
        reply = full[len(prompt) :]  # answer + end-of-turn (+ separator)
        target = answer + tokenizer.eos_token
        if reply.startswith(target):
            learnt, rest = tokenizer.encode(target), tokenizer.encode(reply[len(target) :])
        else:  # a template that does not end turns with eos: learn the whole reply
            learnt, rest = tokenizer.encode(reply), []
        ids += learnt + rest
        learn += [True] * len(learnt) + [False] * len(rest)
        done = full
    return ids, learn


class Collator:
    """Samples -> {input_ids, attention_mask, labels, images}; left padding, labels shifted by one.

    A sample longer than `max_length` is skipped and counted (never cut mid-answer), and so is one
    whose images cannot be read or that has no assistant turn.
    """

    def __init__(self, cfg: VLMConfig, tokenizer: Tokenizer, max_length: int):
        self.cfg, self.tokenizer, self.max_length = cfg, tokenizer, max_length
        self.image_processor = ImageProcessor.from_config(cfg)
        self.skipped: dict[str, int] = {"too_long": 0, "bad_image": 0, "no_image": 0, "no_answer": 0}

    def _skip(self, why: str, detail: str) -> None:
        self.skipped[why] += 1
        log.warning(
            "skipping sample (%s): %s [%d skipped for this reason so far]", why, detail, self.skipped[why]
        )

    def encode(self, sample: Conversation) -> tuple[list[int], list[int], list[np.ndarray]] | None:
        if not sample.images:
            return self._skip("no_image", "no image")
        if not sample.turns or not all(a for _, a in sample.turns):
            return self._skip("no_answer", "no assistant turn")
        tiles, grids = [], []
        for image in sample.images:
            try:
                pixels, grid = self.image_processor(image)
            except (ValueError, OSError) as e:
                return self._skip("bad_image", str(e))
            tiles.append(pixels)
            grids.append(grid)
        if self.cfg.image_placement == "prefix":
            raise ValueError(
                "training with prefix placement (nanoVLM v0.1 configs) is not supported; use v0.2+ configs"
            )
        ids, learn = encode_conversation(self.cfg, self.tokenizer, grids, sample.turns)
        if len(ids) > self.max_length:
            return self._skip("too_long", f"{len(ids)} tokens > max_length {self.max_length}")
        # labels[t] = ids[t+1] where token t+1 is learnt, as nanoVLM's collator does
        labels = [ids[t + 1] if learn[t + 1] else -100 for t in range(len(ids) - 1)] + [-100]
        return ids, labels, tiles

    def __call__(self, samples: list[Conversation]) -> dict[str, torch.Tensor] | None:
        encoded = [e for e in (self.encode(s) for s in samples) if e is not None]
        if not encoded:
            return None
        width = max(len(ids) for ids, _, _ in encoded)
        B = len(encoded)
        input_ids = torch.full((B, width), self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((B, width), dtype=torch.long)
        labels = torch.full((B, width), -100, dtype=torch.long)
        for i, (ids, lab, _) in enumerate(encoded):
            input_ids[i, width - len(ids) :] = torch.tensor(ids)
            attention_mask[i, width - len(ids) :] = 1
            labels[i, width - len(ids) :] = torch.tensor(lab)
        images = torch.from_numpy(np.concatenate([t for _, _, tiles in encoded for t in tiles]))
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "images": images}
