"""`nanovlm-export onnx SRC OUT --layout transformers.js`: what transformers.js loads for an
Idefics3 / SmolVLM checkpoint (its Idefics3ForConditionalGeneration: an image-text-to-text model).

    OUT/config.json, generation_config.json        the checkpoint's own (transformers format)
    OUT/preprocessor_config.json                   the image processor settings, flat, + image_seq_len
    OUT/tokenizer.json, tokenizer_config.json, chat template files: copied from the checkpoint
    OUT/onnx/vision_encoder.onnx        pixel_values [batch_size, num_images, 3, S, S]
                                        -> image_features [batch_size * num_images, image_tokens, hidden]
    OUT/onnx/embed_tokens.onnx          input_ids [batch_size, sequence_length] -> inputs_embeds
    OUT/onnx/decoder_model_merged.onnx  inputs_embeds, attention_mask, position_ids,
                                        past_key_values.{i}.key/value [batch_size, kv_heads, past, head_dim]
                                        -> logits [batch_size, sequence_length, vocab], present.{i}.key/value

These are the session names, input and output names transformers.js binds (its
generic image-text-to-text forward: embed the ids, encode the pixels, put the features at the
`<image>` ids, run the merged decoder with an empty cache first). Its past-cache shapes resolve
the symbol `batch_size` and take 0 for every other name, so the past sequence axis is symbolic.
The vision graph has no pixel_attention_mask input: every tile of one request is a full tile.
"""

from __future__ import annotations

import json
import logging
import os
import shutil

import torch
import torch.nn as nn

from core.config import read_config_json
from core.files import check_target, staged_dir
from export.graphs import decoder_io_names
from export.onnx_export import _onnx_export, check_graph
from nanovlm.checkpoint import resolve_checkpoint
from nanovlm.hf_weights import read_hf_config
from nanovlm.idefics3 import is_idefics3, read_processing
from nanovlm.vision_language_model import VisionLanguageModel

from .variants import add_quantized_variants

log = logging.getLogger(__name__)

COPIED = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "processor_config.json",
)
GRAPHS = ("vision_encoder.onnx", "embed_tokens.onnx", "decoder_model_merged.onnx")


class VisionGraph(nn.Module):
    def __init__(self, model: VisionLanguageModel):
        super().__init__()
        self.vision_encoder, self.MP = model.vision_encoder, model.MP

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # [B, N, 3, S, S] -> [B * N, image_tokens, hidden]
        return self.MP(self.vision_encoder(pixel_values.flatten(0, 1)))


class EmbedGraph(nn.Module):
    def __init__(self, model: VisionLanguageModel):
        super().__init__()
        self.embedding = model.decoder.token_embedding

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(input_ids)  # [B, S] -> [B, S, hidden]


class MergedDecoderGraph(nn.Module):
    def __init__(self, model: VisionLanguageModel):
        super().__init__()
        self.decoder = model.decoder
        self.n_layers = model.cfg.lm_n_blocks

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        *past: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        cache = [(past[2 * i], past[2 * i + 1]) for i in range(self.n_layers)]
        hidden, presents = self.decoder(inputs_embeds, attention_mask, cache, position_ids)
        return (self.decoder.head(hidden), *[t for kv in presents for t in kv])  # logits [B, S, V]


def export_transformers_js(
    src: str, out: str, opset: int = 17, overwrite: bool = False, dtypes: tuple[str, ...] = ("q4", "q8")
) -> str:
    """Write the transformers.js layout of Idefics3 checkpoint `src` (directory or Hub id) to `out`,
    with the quantized variants of `dtypes` (variants.py), renamed into place when complete."""
    directory = resolve_checkpoint(src)
    hf = read_hf_config(directory)
    if not is_idefics3(hf):
        raise ValueError(
            f"{src}: --layout transformers.js takes an Idefics3 / SmolVLM checkpoint in "
            f"transformers' format (model_type {hf.get('model_type')!r})"
        )
    check_target(
        out,
        lambda p: (
            os.path.isdir(os.path.join(p, "onnx"))
            and all(os.path.exists(os.path.join(p, "onnx", g)) for g in GRAPHS)
        ),
        "transformers.js layout",
        overwrite,
    )
    model = VisionLanguageModel.from_pretrained(directory).eval()
    cfg = model.cfg
    image, seq_len, template, _ = read_processing(directory)
    with staged_dir(out, prefix=".tmp-tjs-") as tmp:
        os.makedirs(os.path.join(tmp, "onnx"))
        graph = lambda name: os.path.join(tmp, "onnx", name)  # noqa: E731
        S = cfg.vit_img_size
        log.info("[1/3] exporting onnx/vision_encoder.onnx")
        _onnx_export(
            VisionGraph(model),
            (torch.rand(1, 2, 3, S, S),),
            graph(GRAPHS[0]),
            opset,
            input_names=["pixel_values"],
            output_names=["image_features"],
            dynamic_axes={
                "pixel_values": {0: "batch_size", 1: "num_images"},
                "image_features": {0: "batch_size_x_num_images"},
            },
        )
        log.info("[2/3] exporting onnx/embed_tokens.onnx")
        ids = torch.randint(0, cfg.lm_vocab_size, (1, 3))
        _onnx_export(
            EmbedGraph(model),
            (ids,),
            graph(GRAPHS[1]),
            opset,
            input_names=["input_ids"],
            output_names=["inputs_embeds"],
            dynamic_axes={
                "input_ids": {0: "batch_size", 1: "sequence_length"},
                "inputs_embeds": {0: "batch_size", 1: "sequence_length"},
            },
        )
        log.info("[3/3] exporting onnx/decoder_model_merged.onnx")
        B, T, P = 1, 3, 2
        kv = (B, cfg.lm_n_kv_heads, P, cfg.lm_head_dim)
        args = (
            torch.rand(B, T, cfg.lm_hidden_dim),
            torch.ones(B, P + T, dtype=torch.long),
            torch.arange(P, P + T)[None],
            *[torch.rand(kv) for _ in range(2 * cfg.lm_n_blocks)],
        )
        bundle_inputs, outputs = decoder_io_names(cfg.lm_n_blocks)  # the KV names are the bundle's
        past = bundle_inputs[4:]
        inputs = ["inputs_embeds", "attention_mask", "position_ids", *past]
        axes = {
            "inputs_embeds": {0: "batch_size", 1: "sequence_length"},
            "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
            "position_ids": {0: "batch_size", 1: "sequence_length"},
            "logits": {0: "batch_size", 1: "sequence_length"},
        }
        axes |= {name: {0: "batch_size", 2: "past_sequence_length"} for name in past}
        axes |= {name: {0: "batch_size", 2: "total_sequence_length"} for name in outputs[1:]}
        _onnx_export(
            MergedDecoderGraph(model),
            args,
            graph(GRAPHS[2]),
            opset,
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=axes,
        )
        for name in GRAPHS:
            check_graph(graph(name), opset)
        for name in COPIED:
            if os.path.exists(os.path.join(directory, name)):
                shutil.copy2(os.path.join(directory, name), os.path.join(tmp, name))
        # transformers.js reads the chat template from tokenizer_config.json
        tok_path = os.path.join(tmp, "tokenizer_config.json")
        tok_cfg = read_config_json(tok_path) if os.path.exists(tok_path) else {}
        tok_cfg.setdefault("chat_template", template)
        with open(tok_path, "w") as f:
            json.dump(tok_cfg, f, indent=2)
        pre = {
            **image,
            "processor_class": "Idefics3Processor",
            "image_seq_len": seq_len or cfg.image_token_count,
        }
        pre.setdefault("image_processor_type", "Idefics3ImageProcessor")
        with open(os.path.join(tmp, "preprocessor_config.json"), "w") as f:
            json.dump(pre, f, indent=2)
        add_quantized_variants(tmp, dtypes)
    log.info("transformers.js layout written to %s", out)
    return out
