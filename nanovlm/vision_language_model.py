"""VisionLanguageModel: ViT -> modality projector -> LanguageModel, with nanoVLM's API and checkpoints."""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from core.config import VLMConfig, check_context
from core.processors import Tokenizer
from core.sampling import SamplingConfig, from_nanovlm

from .generation import sample
from .language_model import KV, LanguageModel, positions_from_mask
from .modality_projector import ModalityProjector
from .vision_transformer import ViT


@dataclass
class DecodeState:
    """What the next decode step continues from (gpt-fast's input_pos, kept with its cache)."""

    cache: list[KV]  # per layer (k, v) [B, H_kv, P, D]
    attention_mask: torch.Tensor  # [B, P], 0 = left padding
    position_ids: torch.Tensor  # [B, 1] the last position of each row


log = logging.getLogger(__name__)

ImagesArg = torch.Tensor | np.ndarray | Sequence


class VisionLanguageModel(nn.Module):
    def __init__(self, cfg: VLMConfig, load_backbone: bool = True, tokenizer: Tokenizer | None = None):
        super().__init__()
        self.cfg = cfg
        # With load_backbone, each backbone named in the config is loaded; an empty name means
        # "start that part from random weights" (e.g. a real LM with a from-scratch ViT).
        load_vit = load_backbone and bool(cfg.vit_model_type)
        load_lm = load_backbone and bool(cfg.lm_model_type)
        if load_backbone and not (load_vit and load_lm):
            log.warning(
                "no %s backbone named in the config: starting it from random weights",
                "vision" if not load_vit else "language",
            )
        self.vision_encoder = ViT.from_hf(cfg) if load_vit else ViT(cfg)
        self.decoder = LanguageModel.from_hf(cfg) if load_lm else LanguageModel(cfg)
        cfg.validate()  # the backbones may have rewritten vit_*/lm_* fields
        self.MP = ModalityProjector(cfg)
        self.load_backbone = load_backbone
        self.tokenizer = tokenizer

    # ------------------------------------------------------------------ inputs
    @staticmethod
    def flatten_images(images: ImagesArg | None, device: torch.device | None = None) -> torch.Tensor | None:
        """[N, 3, H, W] tensor from a tensor/array or nanoVLM's list (of per-sample lists) of tensors."""
        if images is None:
            return None
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(images)
        if isinstance(images, (list, tuple)):
            flat = [img for item in images for img in (item if isinstance(item, (list, tuple)) else [item])]
            if not flat:
                return None
            flat = [torch.as_tensor(t) for t in flat]
            images = torch.cat([t if t.dim() == 4 else t.unsqueeze(0) for t in flat], dim=0)
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [N, 3, H, W]; got shape {tuple(images.shape)}")
        return images.to(device) if device is not None else images

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [N, 3, H, W] -> image embeddings [N, image_tokens, lm_hidden]."""
        expected = self.cfg.vit_img_size
        if pixel_values.shape[-2:] != (expected, expected):
            raise ValueError(f"images must be {expected}x{expected}; got {tuple(pixel_values.shape[-2:])}")
        dtype = next(self.vision_encoder.parameters()).dtype
        return self.MP(self.vision_encoder(pixel_values.to(dtype)))

    def merge_image_embeds(
        self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token embeddings with the image embeddings placed -> (embeds [B, S, D], attention_mask [B, S])."""
        token_embd = self.decoder.token_embedding(input_ids)  # [B, T, D]
        if image_embeds is None:
            if self.cfg.image_placement == "replace" and bool((input_ids == self.cfg.image_token_id).any()):
                raise ValueError("input_ids contain image tokens but no images were given")
            return token_embd, attention_mask
        image_embeds = image_embeds.to(token_embd.dtype)
        if self.cfg.image_placement == "prefix":
            B = input_ids.shape[0]
            if image_embeds.shape[0] != B:
                raise ValueError(
                    f"prefix placement takes one image per sample: {image_embeds.shape[0]} images, {B} samples"
                )
            ones = torch.ones(
                B, image_embeds.shape[1], dtype=attention_mask.dtype, device=attention_mask.device
            )
            return torch.cat((image_embeds, token_embd), dim=1), torch.cat((ones, attention_mask), dim=1)
        slots = input_ids == self.cfg.image_token_id  # [B, T]
        n_slots, n_embeds = int(slots.sum()), image_embeds.shape[0] * image_embeds.shape[1]
        if n_slots != n_embeds:
            raise ValueError(
                f"input_ids hold {n_slots} image tokens but {image_embeds.shape[0]} images give {n_embeds} "
                f"embeddings ({image_embeds.shape[1]} per image)"
            )
        return token_embd.masked_scatter(
            slots.unsqueeze(-1), image_embeds.reshape(-1, token_embd.shape[-1])
        ), attention_mask

    def embed(
        self, input_ids: torch.Tensor, images: ImagesArg | None, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        pixel_values = self.flatten_images(images, input_ids.device)
        image_embeds = self.encode_images(pixel_values) if pixel_values is not None else None
        return self.merge_image_embeds(input_ids, image_embeds, attention_mask)

    # ------------------------------------------------------------------ training forward
    def forward(
        self,
        input_ids: torch.Tensor,
        images: ImagesArg | None,
        attention_mask: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (logits [B, T_text, V] aligned with input_ids, loss or None).

        targets are next-token labels aligned with input_ids (the collator shifts them, as in
        nanoVLM), -100 where no loss is taken.
        """
        embeds, mask = self.embed(input_ids, images, attention_mask)
        hidden, _ = self.decoder(embeds, mask)
        hidden = hidden[:, embeds.shape[1] - input_ids.shape[1] :]  # drop prefix image positions
        logits = self.decoder.head(hidden)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=-100
            )
        return logits, loss

    # ------------------------------------------------------------------ generation
    def prefill(self, embeds: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, DecodeState]:
        """Run the prompt: embeds [B, S, D], attention_mask [B, S] -> (last logits [B, V], its state)."""
        pos = positions_from_mask(attention_mask, embeds.shape[1])  # [B, S]
        hidden, cache = self.decoder(embeds, attention_mask, None, pos)
        return self.decoder.head(hidden[:, -1]), DecodeState(cache, attention_mask, pos[:, -1:])

    def decode_one_token(self, token: torch.Tensor, state: DecodeState) -> tuple[torch.Tensor, DecodeState]:
        """token [B] at the next position of each row -> (logits [B, V], the state one position on)."""
        mask = torch.cat(
            (state.attention_mask, torch.ones_like(state.attention_mask[:, :1])), dim=1
        )  # [B, P+1]
        pos = state.position_ids + 1  # [B, 1]
        hidden, cache = self.decoder(self.decoder.token_embedding(token[:, None]), mask, state.cache, pos)
        return self.decoder.head(hidden[:, -1]), DecodeState(cache, mask, pos)

    @torch.inference_mode()
    def generate(
        self,
        input_ids: torch.Tensor,
        images: ImagesArg | None,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 5,
        sampling: SamplingConfig | None = None,
        eos_token_id: int | None = None,
        use_kv_cache: bool = True,
        *,
        greedy: bool | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        temperature: float | None = None,
    ) -> torch.Tensor:
        """-> new token ids [B, n] (n <= max_new_tokens). Rows that hit EOS are padded with EOS;
        generation stops once every row has finished. eos_token_id defaults to the tokenizer's;
        `sampling` defaults to greedy. nanoVLM's own keywords (greedy, top_k, top_p, temperature)
        are accepted instead of `sampling`, with nanoVLM's defaults for the ones left out."""
        nanovlm_kw = {"greedy": greedy, "top_k": top_k, "top_p": top_p, "temperature": temperature}
        if any(v is not None for v in nanovlm_kw.values()):
            if sampling is not None:
                given = ", ".join(k for k, v in nanovlm_kw.items() if v is not None)
                raise ValueError(f"pass either sampling= or nanoVLM's keywords ({given}), not both")
            sampling = from_nanovlm(**nanovlm_kw)
        sampling = sampling or SamplingConfig()
        if eos_token_id is None and self.tokenizer is not None:
            eos_token_id = self.tokenizer.eos_token_id
        generator = None
        if sampling.seed is not None:
            generator = torch.Generator(device=input_ids.device).manual_seed(sampling.seed)
        embeds, mask = self.embed(input_ids, images, attention_mask)
        B, S = embeds.shape[:2]
        check_context(S, max_new_tokens, self.cfg.lm_max_position_embeddings)
        logits, state = self.prefill(embeds, mask)
        # tokens the repetition penalty sees: the prompt (padding replaced by a real token of the row)
        seen = input_ids
        if attention_mask is not None:
            seen = torch.where(attention_mask.bool(), input_ids, input_ids[:, -1:])
        finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        out: list[torch.Tensor] = []
        for step in range(max_new_tokens):
            token = sample(logits, sampling, seen, generator)  # [B]
            if eos_token_id is not None:
                token = token.masked_fill(finished, eos_token_id)
                finished |= token == eos_token_id
            out.append(token)
            seen = torch.cat((seen, token[:, None]), dim=1)
            if bool(finished.all()) or step == max_new_tokens - 1:
                break
            if use_kv_cache:
                logits, state = self.decode_one_token(token, state)
            else:  # the seed's loop: recompute the whole sequence every step
                embeds = torch.cat((embeds, self.decoder.token_embedding(token[:, None])), dim=1)
                mask = torch.cat((mask, torch.ones_like(mask[:, :1])), dim=1)
                logits, _ = self.prefill(embeds, mask)
        if not out:
            return torch.empty(B, 0, dtype=torch.long, device=input_ids.device)
        return torch.stack(out, dim=1)

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def from_pretrained(cls, repo_id_or_path: str, *, revision: str | None = None) -> VisionLanguageModel:
        """Load a nanoVLM checkpoint (config.json + model.safetensors) from a directory or the Hub."""
        from .checkpoint import load_checkpoint

        return load_checkpoint(cls, repo_id_or_path, revision=revision)

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write config.json, model.safetensors and the tokenizer files; atomic (temp dir, then rename)."""
        from .checkpoint import save_checkpoint

        save_checkpoint(self, save_directory)

    def push_to_hub(self, repo_id: str, private: bool = False) -> str:
        """Upload the checkpoint and a model card to the Hugging Face Hub; returns the commit URL."""
        from huggingface_hub import create_repo, upload_folder

        repo_id = create_repo(repo_id=repo_id, private=private, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "model")
            self.save_pretrained(path)
            with open(os.path.join(path, "README.md"), "w") as f:
                f.write(model_card(repo_id, self.cfg))
            return str(
                upload_folder(repo_id=repo_id, folder_path=path, commit_message="Upload nanoVLM checkpoint")
            )


def model_card(repo_id: str, cfg: VLMConfig) -> str:
    return f"""---
library_name: nanovlm
license: apache-2.0
pipeline_tag: image-text-to-text
tags: [vision-language, multimodal, nanovlm]
---

# {repo_id}

A nanoVLM-format vision-language model: a SigLIP-style ViT ({cfg.vit_n_blocks} blocks, width {cfg.vit_hidden_dim},
{cfg.vit_img_size}px tiles), a pixel-shuffle projector (factor {cfg.mp_pixel_shuffle_factor}) and a Llama-style
decoder ({cfg.lm_n_blocks} blocks, width {cfg.lm_hidden_dim}). Image placement: {cfg.image_placement}.

The directory holds `config.json`, `model.safetensors` and the tokenizer files, so it loads offline:

```python
from nanovlm import VisionLanguageModel
model = VisionLanguageModel.from_pretrained("{repo_id}")
```

It also loads in nanoVLM (`models.vision_language_model.VisionLanguageModel.from_pretrained`).
"""
