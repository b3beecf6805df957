"""The embedded default: a few-million-parameter VLM and a tokenizer fitted to the built-in data.

Everything here is offline: the tokenizer is a byte-level BPE trained on the built-in dataset's
questions and answers, and the model starts from random weights.
"""

from __future__ import annotations

from core.config import VLMConfig
from core.processors import Tokenizer
from core.shapes_dataset import corpus

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
BASE_VOCAB = 368  # the built-in corpus merges fully at 372


def tiny_config() -> VLMConfig:
    """128 px single-tile images, 16 px patches (8x8 grid), pixel shuffle 2 -> 16 image tokens (one per cell)."""
    return VLMConfig(
        vit_hidden_dim=128,
        vit_inter_dim=256,
        vit_patch_size=16,
        vit_img_size=128,
        vit_n_heads=4,
        vit_n_blocks=4,
        vit_model_type="",
        lm_hidden_dim=128,
        lm_inter_dim=384,
        lm_n_heads=4,
        lm_n_kv_heads=2,
        lm_n_blocks=4,
        lm_base_vocab_size=BASE_VOCAB,
        extra_token_amount=66,
        lm_vocab_size=BASE_VOCAB + 66,
        lm_max_position_embeddings=256,
        lm_max_length=192,
        lm_re_base=10000,
        lm_model_type="",
        lm_tokenizer="",
        mp_pixel_shuffle_factor=2,
        mp_image_token_length=16,
        max_img_size=128,
        hf_repo_name="nanoVLM-tiny-shapes",
    )


def build_tokenizer(cfg: VLMConfig, seed: int = 0) -> Tokenizer:
    """Byte-level BPE with exactly cfg.lm_base_vocab_size tokens, fitted to the built-in data."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.lm_base_vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = corpus(seed=seed) + ["user", "assistant", "system", "\n"]
    tok.train_from_iterator(texts, trainer)
    if tok.get_vocab_size() != cfg.lm_base_vocab_size:
        raise RuntimeError(
            f"BPE produced {tok.get_vocab_size()} tokens, expected {cfg.lm_base_vocab_size}: the corpus is too small"
        )
    return Tokenizer(tok, "<|im_end|>", cfg.vlm_extra_tokens, cfg.lm_base_vocab_size)
