"""Quantized variants of a transformers.js layout, under the file names transformers.js reads for
its `dtype` option: `onnx/<graph>_q4.onnx` (dtype "q4") and `onnx/<graph>_quantized.onnx` ("q8").

Both are weight-only MatMulNBits in blocks of 32, the scheme of this toolkit's int4 and
int8-dynamic recipes, rounded to nearest (no calibration data exists for these graphs): q8 puts
every weight MatMul at 8 bits; q4 puts the decoder's at 4 bits except the layers the int4 recipe
keeps at 8 (docs/quantization.md), the first and last block and the head, and the vision
encoder at 8 bits. The token embedding graph is a lookup, copied unchanged.
"""

from __future__ import annotations

import logging
import os

import onnx

from calibration.nbits import quantize_nbits
from calibration.weight_only import int4_keep_8bit
from core.config import read_config_json

log = logging.getLogger(__name__)

SUFFIXES = {"q4": "_q4", "q8": "_quantized"}  # transformers.js's dtype -> file suffix


def add_quantized_variants(layout: str, dtypes: tuple[str, ...] = ("q4", "q8")) -> list[str]:
    """Write the variants next to the fp32 graphs in `layout`/onnx; -> the files written."""
    n_blocks = read_config_json(os.path.join(layout, "config.json"))["text_config"]["num_hidden_layers"]
    keep_8bit = [*int4_keep_8bit(n_blocks), "/decoder/head/*"]
    written = []
    for dtype in dtypes:
        for graph in ("vision_encoder", "embed_tokens", "decoder_model_merged"):
            src = os.path.join(layout, "onnx", f"{graph}.onnx")
            dst = os.path.join(layout, "onnx", f"{graph}{SUFFIXES[dtype]}.onnx")
            model = onnx.load(src)
            if graph != "embed_tokens":
                bits = 4 if dtype == "q4" and graph == "decoder_model_merged" else 8
                model = quantize_nbits(model, bits, keep_8bit=keep_8bit if bits == 4 else [])
            onnx.save(model, dst)
            written.append(dst)
            log.info("%s: %s", dtype, os.path.basename(dst))
    return written
