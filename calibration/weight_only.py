"""Weight-only modes (int8-dynamic, int4, int4-fp16, and the fp16 rewrite): each graph's weight
MatMuls become MatMulNBits; int4 keeps the layers measured to be sensitive at 8 bits and rounds
the rest by GPTQ on the recorded decoder inputs. The vision encoder is 8-bit throughout:
DynamicQuantizeMatMul for the CPU recipes (dynamic_int8.py), 8-bit MatMulNBits for int4-fp16."""

from __future__ import annotations

import logging

import numpy as np
import onnx

from core.bundle import Bundle
from core.recipes import Recipe

from .dynamic_int8 import quantize_dynamic_int8
from .fp16 import to_fp16
from .gptq import DAMPING
from .nbits import matches, quantize_nbits, weight_matmuls

log = logging.getLogger(__name__)

# Decoder MatMuls the int4 recipe keeps at 8 bits, and how many blocks at each end stay 8-bit
# (the sensitivity table in docs/quantization.md).
INT4_KEEP_8BIT = ("*/mlp/down_proj/*", "*/attn/v_proj/*", "*/attn/k_proj/*", "*/attn/out_proj/*")
INT4_EDGE_BLOCKS_8BIT = 1
INT4_HEAD_BITS = 8  # the tied embedding/head matrix in the int4 recipe


def edge_blocks(layers: int, n: int) -> list[int]:
    """The first n and last n of `layers` decoder block indices."""
    return sorted({*range(min(n, layers)), *range(max(layers - n, 0), layers)})


def int4_keep_8bit(layers: int) -> list[str]:
    """Decoder MatMul patterns the int4 recipe keeps at 8 bits, for a decoder of `layers` blocks."""
    return [*INT4_KEEP_8BIT, *(f"*/blocks.{i}/*" for i in edge_blocks(layers, INT4_EDGE_BLOCKS_8BIT))]


def keep_8bit(bundle: Bundle, recipe: Recipe) -> list[str]:
    """Decoder MatMul patterns kept at 8 bits (none unless the recipe's weights are 4-bit)."""
    return int4_keep_8bit(bundle.config.lm_n_blocks) if recipe.weight_bits == 4 else []


def gptq_statistics(
    bundle: Bundle, recipe: Recipe, plan: dict, decoder_feeds: list[dict[str, np.ndarray]]
) -> tuple[dict | None, dict | None]:
    """(per-channel input importance, GPTQ Gram matrices) of the 4-bit decoder MatMuls."""
    if recipe.weight_bits != 4:
        return None, None
    from .importance import activation_importance

    def four_bit(name: str) -> bool:
        return not matches(name, [*plan["kept_8bit"], *plan["excluded"]])

    importance, grams = activation_importance(bundle.graph_path("decoder"), decoder_feeds, four_bit)
    plan["notes"]["importance"] = "4-bit scales searched with per-channel activation importance"
    if grams:
        plan["notes"]["gptq"] = f"{len(grams)} 4-bit MatMuls rounded by GPTQ (damping {DAMPING})"
    return importance, grams


def per_token(model: onnx.ModelProto, recipe: Recipe, plan: dict, feeds: list[dict[str, np.ndarray]]) -> None:
    """In place: the recipe's per-token W8A8 MatMuls, smoothed on the recorded decoder inputs first;
    the rest are left for MatMulNBits."""
    from .per_token_int8 import quantize_per_token, rotation_block
    from .smoothquant import smooth

    chosen = {
        n.name
        for n in weight_matmuls(model)
        if matches(n.name, list(recipe.per_token_int8)) and not matches(n.name, plan["excluded"])
    }
    smoothed = smooth(model, feeds, recipe.smooth_alpha, only=chosen) if recipe.smooth_alpha else []
    inits = {i.name: i for i in model.graph.initializer}
    blocks = {  # input -> Hadamard block, from its MatMuls' K
        n.input[0]: rotation_block(inits[n.input[1]].dims[0])
        for n in weight_matmuls(model)
        if n.name in chosen and matches(n.name, list(recipe.hadamard))
    }
    rotations = {x: b for x, b in blocks.items() if b > 1}
    quantize_per_token(model, lambda node: node.name in chosen, rotations=rotations)
    plan["per_token_int8"] = sorted(chosen)
    rotated = (
        f", {len(rotations)} inputs rotated by Hadamard blocks of {max(rotations.values())} (at most)"
        if rotations
        else ""
    )
    plan["notes"]["per_token_int8"] = (
        f"{len(chosen)} decoder MatMuls as per-token W8A8 (uint8 activations, one scale per token; "
        f"int8 weights per column, neighbouring pairs within 128), {len(smoothed)} input groups smoothed "
        f"first (SmoothQuant alpha {recipe.smooth_alpha}){rotated}; the other MatMuls 8-bit MatMulNBits"
    )


def quantize_graph(
    model: onnx.ModelProto,
    graph: str,
    recipe: Recipe,
    plan: dict,
    importance: dict | None = None,
    grams: dict | None = None,
    feeds: list[dict[str, np.ndarray]] | None = None,
) -> onnx.ModelProto:
    """One graph of the bundle under a float or weight-only recipe (`feeds`: the recorded decoder
    inputs, for a recipe with per-token W8A8 layers)."""
    if recipe.fp16:
        model = to_fp16(model)
    if recipe.weight_bits is None:
        return model
    decoder = graph == "decoder"
    if not decoder and recipe.vision_dynamic_int8:
        return quantize_dynamic_int8(model, exclude=plan["excluded"])
    if decoder and recipe.per_token_int8:
        per_token(model, recipe, plan, feeds or [])
    bits = recipe.weight_bits if decoder else 8
    return quantize_nbits(
        model,
        bits,
        keep_8bit=plan["kept_8bit"] if decoder else [],
        exclude=plan["excluded"],
        head_bits=INT4_HEAD_BITS if bits == 4 else 8,
        importance=importance if decoder else None,
        grams=grams if decoder else None,
    )
