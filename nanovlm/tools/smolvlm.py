"""Write an Idefics3 / SmolVLM checkpoint offline with transformers' own save_pretrained: random
weights at any shape, a given tokenizer plus Idefics3's image tokens, SmolVLM's processor settings
and chat template. The tests write tiny ones; benchmarks/smolvlm_speed.py SmolVLM-256M's shape.
"""

from __future__ import annotations

import os
from typing import Any

IMAGE_TOKENS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"] + [
    f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)
]
CHAT_TEMPLATE = (  # SmolVLM's
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}{% if message['content'][0]['type'] "
    "== 'image' %}{{':'}}{% else %}{{': '}}{% endif %}{% for line in message['content'] %}{% if line['type'] == "
    "'text' %}{{line['text']}}{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def write_smolvlm(
    out: str | os.PathLike,
    tokenizer: Any,
    vision: dict[str, Any],
    text: dict[str, Any],
    scale_factor: int,
    image_seq_len: int,
    longest_edge: int,
    tile: int,
    tie: bool = False,
    seed: int = 0,
    weight_scale: float = 1.0,
    video: dict[str, Any] | None = None,
) -> None:
    """Save a random Idefics3ForConditionalGeneration and its Idefics3Processor to `out`.

    tokenizer: a PreTrainedTokenizerFast with eos/pad/bos set (IMAGE_TOKENS are added to it);
    vision / text: the SigLIP and Llama config fields; longest_edge: images are resized to it,
    then split into `tile`-pixel tiles; weight_scale multiplies every matrix (a tiny model's 0.02
    init gives greedy answers of one repeated token). With `video` ({"fps", "max_frames", "size"}):
    a SmolVLM2 checkpoint instead (SmolVLMForConditionalGeneration, SmolVLMProcessor with its video
    processor; transformers builds that processor only where torchvision imports)."""
    import torch
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    if video is not None:
        from transformers import SmolVLMConfig as Idefics3Config  # noqa: N814 - same fields
        from transformers import SmolVLMForConditionalGeneration as Idefics3ForConditionalGeneration  # noqa: N814
    tokenizer.add_special_tokens({"additional_special_tokens": IMAGE_TOKENS})
    cfg = Idefics3Config(
        vision_config=dict(vision),
        text_config=dict(
            model_type="llama",
            **text,
            vocab_size=len(tokenizer),
            tie_word_embeddings=tie,
            pad_token_id=tokenizer.pad_token_id,
        ),
        scale_factor=scale_factor,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        tie_word_embeddings=tie,
    )
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(cfg).eval()
    if weight_scale != 1.0:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() > 1:
                    p.mul_(weight_scale)
    model.save_pretrained(out)
    images = Idefics3ImageProcessorPil(
        size={"longest_edge": longest_edge}, max_image_size={"longest_edge": tile}, do_image_splitting=True
    )
    if video is None:
        Idefics3Processor(
            image_processor=images,
            tokenizer=tokenizer,
            image_seq_len=image_seq_len,
            chat_template=CHAT_TEMPLATE,
        ).save_pretrained(out)
        return
    from transformers import SmolVLMProcessor
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil
    from transformers.models.smolvlm.video_processing_smolvlm import SmolVLMVideoProcessor

    frames = SmolVLMVideoProcessor(
        video_sampling={
            "fps": video["fps"],
            "max_frames": video["max_frames"],
            "video_size": {"longest_edge": video["size"]},
        },
        size={"longest_edge": video["size"]},
        max_image_size={"longest_edge": tile},
    )
    images = SmolVLMImageProcessorPil(
        size={"longest_edge": longest_edge}, max_image_size={"longest_edge": tile}, do_image_splitting=True
    )
    SmolVLMProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        video_processor=frames,
        image_seq_len=image_seq_len,
        chat_template=CHAT_TEMPLATE,
    ).save_pretrained(out)
