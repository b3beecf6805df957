"""fp16 export: fp16 weights and compute, with the numerically fragile parts kept in fp32.

Kept in fp32: graph inputs and outputs (pixel values, image embeddings, logits), RMSNorm and
LayerNorm statistics (our RMSNorm computes them in fp32; ONNX LayerNormalization computes them in
its fp32 `stash_type`), RoPE angles (the `inv_freq` buffer stays fp32: in fp16 its small entries
lose ~1e-3 relative precision, which becomes radians of error at long positions), attention
scores and softmax, and the final logits. The KV cache is fp16, like the compute.
"""

from __future__ import annotations

from nanovlm.language_model import LanguageModelGroupedQueryAttention, RotaryEmbedding
from nanovlm.vision_language_model import VisionLanguageModel
from nanovlm.vision_transformer import ViTMultiHeadAttention


def prepare_fp16(model: VisionLanguageModel) -> VisionLanguageModel:
    model.half()
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.inv_freq = RotaryEmbedding(model.cfg).inv_freq.to(
                module.inv_freq.device
            )  # fresh fp32 copy
        if isinstance(module, (ViTMultiHeadAttention, LanguageModelGroupedQueryAttention)):
            module.softmax_fp32 = True
    if model.cfg.lm_tie_weights:
        assert model.decoder.head.weight is model.decoder.token_embedding.weight
    return model
