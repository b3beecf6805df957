"""Llama / SmolLM2 decoder with nanoVLM's module names: RMSNorm, half-split RoPE, GQA, SwiGLU, tied head.

The forward pass is written for export: the KV cache is explicit (past in, present out), positions
come in as `position_ids`, and the attention mask is built from tensor shapes only, so tracing
records no data-dependent Python branches (no `.item()`, no shape-dependent `is_causal`, no RoPE
rescaling).
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from core.config import VLMConfig

from .hf_weights import TensorSource, copy_into, read_hf_config

log = logging.getLogger(__name__)

# One layer's cache: (key, value), each [B, n_kv_heads, T, head_dim].
KV = tuple[torch.Tensor, torch.Tensor]


class RMSNorm(nn.Module):
    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(cfg.lm_hidden_dim))
        self.eps = cfg.lm_rms_eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Statistics in fp32 so bf16/fp16 activations cannot overflow the mean of squares.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class RotaryEmbedding(nn.Module):
    def __init__(self, cfg: VLMConfig):
        super().__init__()
        dim = cfg.lm_head_dim
        inv_freq = 1.0 / (cfg.lm_re_base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        # Persistent, as in nanoVLM: its checkpoints carry `decoder.rotary_embd.inv_freq`.
        self.register_buffer("inv_freq", inv_freq)
        self.attention_scaling = cfg.lm_attn_scaling

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # position_ids: [B, S] -> cos, sin: [B, S, head_dim], always computed in fp32
        freqs = position_ids.float().unsqueeze(-1) * self.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [B, H, S, hd]; cos/sin: [B, S, hd]
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (x.float() * cos + rotate_half(x.float()) * sin).to(x.dtype)


def attention_bias(attention_mask: torch.Tensor, seq_len: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention bias [B, 1, S, P+S] from a key padding mask [B, P+S] (1 = real token).

    Query i (absolute index P+i) sees key j when j <= P+i and key j is not padding. Each query also
    sees itself, so padded query rows stay finite (their outputs are never used).
    """
    total = attention_mask.shape[1]
    q_idx = torch.arange(seq_len, device=attention_mask.device) + (total - seq_len)  # [S]
    k_idx = torch.arange(total, device=attention_mask.device)  # [T]
    causal = k_idx[None, :] <= q_idx[:, None]  # [S, T]
    is_self = k_idx[None, :] == q_idx[:, None]  # [S, T]
    keep = causal[None] & (attention_mask[:, None, :].bool() | is_self[None])  # [B, S, T]
    zero = torch.zeros((), dtype=dtype, device=attention_mask.device)
    neg = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=attention_mask.device)
    return torch.where(keep, zero, neg).unsqueeze(1)


def attention_fp32_softmax(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + bias) v with the scores and softmax in fp32 and the matmuls in q's dtype.

    Used by fp16 exports: fp16 scores plus a large negative mask can overflow, and an fp16
    softmax loses the small probabilities.
    """
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * (1.0 / math.sqrt(q.shape[-1]))
    if bias is not None:
        scores = scores + bias.float()
    return torch.matmul(scores.softmax(-1).to(v.dtype), v)


def positions_from_mask(attention_mask: torch.Tensor, seq_len: int) -> torch.Tensor:
    """position_ids [B, S] for the last S slots of a left-padded mask [B, P+S]: 0 at each row's first token."""
    pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return pos[:, -seq_len:]


class LanguageModelGroupedQueryAttention(nn.Module):
    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads = cfg.lm_n_heads, cfg.lm_n_kv_heads
        self.head_dim = cfg.lm_head_dim
        self.dropout = cfg.lm_dropout
        d, kv = cfg.lm_hidden_dim, cfg.lm_n_kv_heads * cfg.lm_head_dim
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, kv, bias=False)
        self.v_proj = nn.Linear(d, kv, bias=False)
        self.out_proj = nn.Linear(d, d, bias=False)
        self.resid_dropout = nn.Dropout(cfg.lm_dropout)
        self.softmax_fp32 = False  # set for fp16 export (see attention_fp32_softmax)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        bias: torch.Tensor,
        past: KV | None = None,
    ) -> tuple[torch.Tensor, KV]:
        B, S, D = x.shape
        q = self.q_proj(x).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, S, hd]
        k = self.k_proj(x).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, S, hd]
        v = self.v_proj(x).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if past is not None:
            k = torch.cat((past[0], k), dim=2)  # [B, Hkv, P+S, hd]
            v = torch.cat((past[1], v), dim=2)
        present = (k, v)
        # GQA: each K/V head serves n_heads/n_kv_heads query heads. expand+reshape exports to plain ops.
        groups = self.n_heads // self.n_kv_heads
        T = k.shape[2]
        k = (
            k[:, :, None]
            .expand(B, self.n_kv_heads, groups, T, self.head_dim)
            .reshape(B, self.n_heads, T, self.head_dim)
        )
        v = (
            v[:, :, None]
            .expand(B, self.n_kv_heads, groups, T, self.head_dim)
            .reshape(B, self.n_heads, T, self.head_dim)
        )
        if self.softmax_fp32:
            y = attention_fp32_softmax(q, k, v, bias)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=bias.to(q.dtype), dropout_p=self.dropout if self.training else 0.0
            )
        y = y.transpose(1, 2).reshape(B, S, D)
        return self.resid_dropout(self.out_proj(y)), present


class LanguageModelMLP(nn.Module):
    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.lm_hidden_dim, cfg.lm_inter_dim, bias=False)
        self.up_proj = nn.Linear(cfg.lm_hidden_dim, cfg.lm_inter_dim, bias=False)
        self.down_proj = nn.Linear(cfg.lm_inter_dim, cfg.lm_hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LanguageModelBlock(nn.Module):
    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.mlp = LanguageModelMLP(cfg)
        self.attn = LanguageModelGroupedQueryAttention(cfg)
        self.norm1 = RMSNorm(cfg)
        self.norm2 = RMSNorm(cfg)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        bias: torch.Tensor,
        past: KV | None = None,
    ) -> tuple[torch.Tensor, KV]:
        h, present = self.attn(self.norm1(x), cos, sin, bias, past)
        x = x + h
        return x + self.mlp(self.norm2(x)), present


class LanguageModel(nn.Module):
    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.cfg = cfg
        self.lm_use_tokens = cfg.lm_use_tokens
        self.token_embedding = nn.Embedding(cfg.lm_vocab_size, cfg.lm_hidden_dim)
        self.rotary_embd = RotaryEmbedding(cfg)
        self.blocks = nn.ModuleList([LanguageModelBlock(cfg) for _ in range(cfg.lm_n_blocks)])
        self.norm = RMSNorm(cfg)
        self.head = nn.Linear(cfg.lm_hidden_dim, cfg.lm_vocab_size, bias=False)
        self.apply(_init_weights)
        if cfg.lm_tie_weights:
            self.head.weight = self.token_embedding.weight

    def forward(
        self,
        x: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: list[KV] | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[KV]]:
        """One decoder pass over S new positions.

        x: [B, S, D] embeddings (or [B, S] token ids when lm_use_tokens)
        attention_mask: [B, P+S], 1 for real tokens, 0 for (left) padding; None = all real
        past_key_values: n_blocks x (k, v) [B, Hkv, P, hd], or None for an empty cache
        position_ids: [B, S]; None derives them from attention_mask
        returns: hidden states [B, S, D] after the final norm (logits [B, S, V] when lm_use_tokens),
                 and the present cache, n_blocks x (k, v) [B, Hkv, P+S, hd]
        """
        if self.lm_use_tokens:
            x = self.token_embedding(x)
        B, S = x.shape[:2]
        past_len = past_key_values[0][0].shape[2] if past_key_values is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(B, past_len + S, dtype=torch.long, device=x.device)
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask, S)
        cos, sin = self.rotary_embd(position_ids)
        bias = attention_bias(attention_mask, S, torch.float32)
        presents = []
        for i, block in enumerate(self.blocks):
            x, present = block(x, cos, sin, bias, past_key_values[i] if past_key_values is not None else None)
            presents.append(present)
        x = self.norm(x)
        if self.lm_use_tokens:
            x = self.head(x)
        return x, presents

    # ------------------------------------------------------------------ HF backbone
    @staticmethod
    def config_from_hf(hf: dict, cfg: VLMConfig) -> None:
        """Copy a Llama/SmolLM2 HF config into cfg; the vocabulary is extended for the extra tokens."""
        rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
        if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
            raise ValueError(f"LM backbone uses RoPE scaling {rope!r}, which this toolkit does not implement")
        heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
        if head_dim * heads != hf["hidden_size"]:
            raise ValueError(
                f"LM backbone head_dim={head_dim} x heads={heads} != hidden_size={hf['hidden_size']}"
            )
        cfg.lm_hidden_dim = hf["hidden_size"]
        cfg.lm_inter_dim = hf["intermediate_size"]
        cfg.lm_rms_eps = hf.get("rms_norm_eps", 1e-5)
        cfg.lm_re_base = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
        cfg.lm_max_position_embeddings = hf.get("max_position_embeddings", 2048)
        cfg.lm_n_heads = heads
        cfg.lm_n_kv_heads = hf.get("num_key_value_heads", heads)
        cfg.lm_n_blocks = hf["num_hidden_layers"]
        cfg.lm_dropout = hf.get("attention_dropout", 0.0)
        cfg.lm_tie_weights = hf.get("tie_word_embeddings", True)
        cfg.lm_base_vocab_size = hf["vocab_size"]
        cfg.lm_vocab_size = hf["vocab_size"] + (cfg.extra_token_amount if cfg.vlm_extra_tokens else 0)

    @classmethod
    def from_hf(cls, cfg: VLMConfig, revision: str | None = None) -> LanguageModel:
        """Load Llama/SmolLM2 weights (HF format) from cfg.lm_model_type, a Hub id or a directory.

        Rows for the extra image tokens keep their fresh N(0, 0.02) initialisation, as in nanoVLM.
        """
        cls.config_from_hf(read_hf_config(cfg.lm_model_type, revision), cfg)
        model = cls(cfg)
        source = TensorSource(cfg.lm_model_type, revision)
        # LlamaForCausalLM names start with "model."; a bare LlamaModel's do not.
        prefix = "model." if "model.embed_tokens.weight" in source else ""
        copy_into(model, source, llama_weight_table(cfg.lm_n_blocks, prefix))
        base = cfg.lm_base_vocab_size
        with torch.no_grad():
            model.token_embedding.weight[:base].copy_(source.get(f"{prefix}embed_tokens.weight"))
            if not cfg.lm_tie_weights:
                model.head.weight[:base].copy_(source.get("lm_head.weight"))
        log.info(
            "loaded LM backbone %s (%d params)", cfg.lm_model_type, sum(p.numel() for p in model.parameters())
        )
        return model


def llama_weight_table(n_blocks: int, prefix: str = "model.") -> dict[str, str]:
    """HF Llama tensor name -> our name (embedding and head are copied row-wise separately)."""
    table = {f"{prefix}norm.weight": "norm.weight"}
    for i in range(n_blocks):
        hf, our = f"{prefix}layers.{i}", f"blocks.{i}"
        table.update(
            {
                f"{hf}.self_attn.q_proj.weight": f"{our}.attn.q_proj.weight",
                f"{hf}.self_attn.k_proj.weight": f"{our}.attn.k_proj.weight",
                f"{hf}.self_attn.v_proj.weight": f"{our}.attn.v_proj.weight",
                f"{hf}.self_attn.o_proj.weight": f"{our}.attn.out_proj.weight",
                f"{hf}.mlp.gate_proj.weight": f"{our}.mlp.gate_proj.weight",
                f"{hf}.mlp.up_proj.weight": f"{our}.mlp.up_proj.weight",
                f"{hf}.mlp.down_proj.weight": f"{our}.mlp.down_proj.weight",
                f"{hf}.input_layernorm.weight": f"{our}.norm1.weight",
                f"{hf}.post_attention_layernorm.weight": f"{our}.norm2.weight",
            }
        )
    return table


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    elif isinstance(module, RMSNorm):
        nn.init.ones_(module.weight)
