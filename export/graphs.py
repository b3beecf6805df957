"""The two exported graphs, as thin torch modules over the reference model.

vision_encoder: pixel_values [num_images, 3, H, W] -> image_embeds [num_images, image_tokens, hidden]
decoder:        one step of the KV-cached decoder, prefill (past = 0) and decode alike.

The decoder takes token ids and merges the image embeddings itself, so the tied embedding / head
matrix is one initializer in one graph (stored once in the bundle) and no separate embedding
graph runs per step. Image positions are the ids equal to `image_token_id` (`<|image|>` for v0.2+
checkpoints; for v0.1 prefix checkpoints the runtime writes -1 at the image positions in front of
the text), and they take rows of `image_embeds` in order of appearance.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from nanovlm.vision_language_model import VisionLanguageModel


class VisionEncoderGraph(nn.Module):
    def __init__(self, model: VisionLanguageModel):
        super().__init__()
        self.vision_encoder, self.MP = model.vision_encoder, model.MP

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # fp32 in and out whatever the weights' precision
        dtype = self.MP.proj.weight.dtype
        return self.MP(self.vision_encoder(pixel_values.to(dtype))).float()


class DecoderGraph(nn.Module):
    def __init__(self, model: VisionLanguageModel):
        super().__init__()
        self.decoder = model.decoder
        cfg = model.cfg
        self.image_token_id = cfg.image_slot_id
        self.n_layers = cfg.lm_n_blocks

    def forward(
        self,
        input_ids: torch.Tensor,  # [B, S] int64
        image_embeds: torch.Tensor,  # [N, D]: image rows in order of appearance; N = 0 on decode steps
        attention_mask: torch.Tensor,  # [B, P+S] int64, 1 = real token
        position_ids: torch.Tensor,  # [B, S] int64
        *past: torch.Tensor,  # n_layers x (key, value) [B, Hkv, P, hd]
    ) -> tuple[torch.Tensor, ...]:
        B, S = input_ids.shape
        is_img = input_ids == self.image_token_id  # [B, S]
        # -1 (prefix image slots) is no vocabulary row: look up row 0 there, then overwrite it.
        tokens = self.decoder.token_embedding(
            torch.where(input_ids < 0, torch.zeros_like(input_ids), input_ids)
        )
        # Row k of image_embeds goes to the k-th image position; other positions read a zero row
        # appended at the end, so the gather is valid even when N = 0.
        flat = is_img.reshape(-1)
        table = torch.cat((image_embeds.to(tokens.dtype), tokens.new_zeros(1, tokens.shape[-1])), dim=0)
        n_rows = image_embeds.shape[0]
        # counted in float32 (exact below 2^24 positions): TensorRT's CumSum takes float types only
        rows = torch.cumsum(flat.to(torch.float32), 0).to(torch.int64) - 1
        # An image token with no row left (e.g. one the model generated) stays a plain token,
        # exactly as in the PyTorch reference.
        flat = flat & (rows < n_rows)
        rows = torch.where(flat, rows, torch.full_like(rows, n_rows))
        images = table[rows].reshape(B, S, -1)
        x = torch.where(flat.reshape(B, S, 1), images, tokens)
        cache = [(past[2 * i], past[2 * i + 1]) for i in range(self.n_layers)]
        hidden, presents = self.decoder(x, attention_mask, cache, position_ids)
        # Only the last position's logits: prefill needs no full-vocabulary projection per prompt token.
        logits = self.decoder.head(hidden[:, -1, :]).float()  # [B, V]
        return (logits, *[t for kv in presents for t in kv])


def decoder_io_names(n_layers: int) -> tuple[list[str], list[str]]:
    inputs = ["input_ids", "image_embeds", "attention_mask", "position_ids"]
    outputs = ["logits"]
    for i in range(n_layers):
        inputs += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        outputs += [f"present.{i}.key", f"present.{i}.value"]
    return inputs, outputs
