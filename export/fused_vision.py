"""The vision encoder + projector as a lean ONNX Runtime graph, written node by node from the weights.

`torch.onnx.export` of the SigLIP encoder spells attention out as MatMul / Mul / Softmax / MatMul
over [N, heads, T, T] scores, which at 1,024 patches (SmolVLM's 512 px tiles) is 12 x 4 MB of
scores per layer written and read back, plus the transposes around it. This graph does the same
computation with ONNX Runtime's fused contrib ops where they pay, 9 nodes per layer:

    MatMul (qkv), Split                 one projection, three views
    MultiHeadAttention                  bias add, heads, softmax(QK^T / sqrt(hd)) V; on the CPU
                                        provider a blocked (flash) kernel that keeps scores in L2
    MatMul (out), Add, Add, LayerNorm   out bias, residual add, LayerNorm
    MatMul (fc1), FastGelu              fc1 bias + tanh GELU
    MatMul (fc2)                        its bias and the residual go to the next Add, Add, LayerNorm

The patch embedding is a reshape/transpose of the pixels into 16x16x3 patches and one MatMul
(with the conv bias and position embedding as one added constant), so it quantizes like every
other layer; the projector is nanoVLM's pixel shuffle and its linear layer. Inputs and outputs are
the standard graph's (pixel_values [N, 3, H, W] -> image_embeds [N, tokens, lm_hidden]) and the
weight MatMuls keep the standard export's names (`/vision_encoder/blocks.{i}/attn/qkv_proj/MatMul`,
...). ONNX Runtime only (CPU, fp32), never TensorRT: the standard graph stays the portable one.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from nanovlm.vision_language_model import VisionLanguageModel

from .fused_decoder import MS, OPSET, _Graph


def build_fused_vision(model: VisionLanguageModel) -> onnx.ModelProto:
    """The fused vision_encoder graph of `model` (fp32 weights), same IO as the standard export."""
    cfg = model.cfg
    sd = {
        k: v.detach().float().cpu().numpy()
        for k, v in {**model.vision_encoder.state_dict(), **model.MP.state_dict()}.items()
    }
    D, H, p, eps = cfg.vit_hidden_dim, cfg.vit_n_heads, cfg.vit_patch_size, float(cfg.vit_ln_eps)
    grid, f = cfg.vit_grid, cfg.mp_pixel_shuffle_factor
    g = _Graph()
    i64 = lambda name, v: g.const(name, np.array(v, np.int64))  # noqa: E731

    def weight(name: str) -> str:  # torch Linear [out, in] -> MatMul [in, out]
        return g.const(name, sd[name].T)

    def param(name: str) -> str:
        return g.const(name, sd[name])

    def skip_norm(y: str, residual: str, norm: str, bias: str, where: str) -> tuple[str, str]:
        """LayerNorm `norm` of residual + (y + bias) -> (normed, the new residual). Two Adds and
        LayerNormalization, not the contrib SkipLayerNormalization: on ONNX Runtime's CPU provider
        that kernel takes 1.7 ms on one 1,024 x 768 view's activations against 0.33 ms for these
        three (measured, onnxruntime 1.32), 12% of a view's encode."""
        biased = g.one("Add", [y, param(bias)], f"{where}/bias_add")
        total = g.one("Add", [residual, biased], f"{where}/residual_add")
        h = g.one(
            "LayerNormalization",
            [total, param(f"{norm}.weight"), param(f"{norm}.bias")],
            f"{where}/LayerNormalization",
            axis=-1,
            epsilon=eps,
        )
        return h, total

    # -- patches: [N, 3, grid*p, grid*p] -> [N, grid*grid, 3*p*p] in the conv weight's (c, y, x) order
    x = g.one("Reshape", ["pixel_values", i64("/patch/shape6", [0, 3, grid, p, grid, p])], "/patch/Reshape")
    x = g.one("Transpose", [x], "/patch/Transpose", perm=[0, 2, 4, 1, 3, 5])
    x = g.one("Reshape", [x, i64("/patch/shape3", [0, grid * grid, 3 * p * p])], "/patch/Reshape_1")
    conv = sd["patch_embedding.conv.weight"].reshape(D, 3 * p * p)  # [D, 3, p, p] -> [D, 3pp]
    x = g.one(
        "MatMul",
        [x, g.const("patch_embedding.conv.weight", conv.T)],
        "/vision_encoder/patch_embedding/MatMul",
    )
    pos = sd["patch_embedding.position_embedding"] + sd["patch_embedding.conv.bias"]  # [1, T, D]
    x = g.one(
        "Add", [x, g.const("patch_embedding.position_bias", pos)], "/vision_encoder/patch_embedding/Add"
    )

    # -- blocks: h is the normed input of the next sublayer, x the residual stream
    h = g.one(
        "LayerNormalization",
        [x, param("blocks.0.ln1.weight"), param("blocks.0.ln1.bias")],
        "/vision_encoder/blocks.0/ln1/LayerNormalization",
        axis=-1,
        epsilon=eps,
    )
    n = cfg.vit_n_blocks
    for i in range(n):
        b = f"blocks.{i}"
        at = f"/vision_encoder/{b}"
        qkv = g.one("MatMul", [h, weight(f"{b}.attn.qkv_proj.weight")], f"{at}/attn/qkv_proj/MatMul")
        q, k, v = g.op(
            "Split", [qkv, i64(f"{b}.attn.split", [D, D, D])], f"{at}/attn/Split", outputs=3, axis=2
        )
        a = g.one(
            "MultiHeadAttention",
            [q, k, v, param(f"{b}.attn.qkv_proj.bias")],
            f"{at}/attn/MultiHeadAttention",
            domain=MS,
            num_heads=H,
        )
        o = g.one("MatMul", [a, weight(f"{b}.attn.out_proj.weight")], f"{at}/attn/out_proj/MatMul")
        h, x = skip_norm(o, x, f"{b}.ln2", f"{b}.attn.out_proj.bias", f"{at}/ln2")
        u = g.one("MatMul", [h, weight(f"{b}.mlp.fc1.weight")], f"{at}/mlp/fc1/MatMul")
        u = g.one(
            "FastGelu",
            [u, param(f"{b}.mlp.fc1.bias")],
            f"{at}/mlp/FastGelu",
            domain=MS,
        )
        m = g.one("MatMul", [u, weight(f"{b}.mlp.fc2.weight")], f"{at}/mlp/fc2/MatMul")
        nxt = f"blocks.{i + 1}.ln1" if i + 1 < n else "layer_norm"
        where = f"/vision_encoder/{nxt.replace('.ln1', '/ln1')}"
        h, x = skip_norm(m, x, nxt, f"{b}.mlp.fc2.bias", where)

    # -- projector: pixel shuffle [N, g*g, D] -> [N, (g/f)^2, D*f*f], then its linear layer
    s = grid // f
    y = g.one("Reshape", [h, i64("/MP/shape6", [0, s, f, s, f, D])], "/MP/Reshape")
    y = g.one("Transpose", [y], "/MP/Transpose", perm=[0, 1, 3, 2, 4, 5])
    y = g.one("Reshape", [y, i64("/MP/shape3", [0, s * s, D * f * f])], "/MP/Reshape_1")
    g.op(
        "MatMul",
        [y, g.const("MP.proj.weight", sd["proj.weight"].T)],
        "/MP/proj/MatMul",
        outputs=["image_embeds"],
    )

    size = cfg.vit_img_size
    graph = helper.make_graph(
        g.nodes,
        "vision_encoder_fused",
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["num_images", 3, size, size])],
        [
            helper.make_tensor_value_info(
                "image_embeds", TensorProto.FLOAT, ["num_images", s * s, cfg.lm_hidden_dim]
            )
        ],
        g.inits,
    )
    return helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)],
        producer_name="nanovlm-edge",
    )
