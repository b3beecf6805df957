"""llama.cpp as the reference point for CPU decode speed: SmolLM2 -> GGUF -> Q4_1, timed greedy decode.

Used by benchmarks/quantization_report.py (needs `pip install llama-cpp-python gguf`; the report
skips llama.cpp with a note when they are missing). The GGUF is written from the same
safetensors the bundles come from, with the `gguf` package; Q4_1 is llama.cpp's own quantizer
(`llama_model_quantize`), so the comparison is on identical weights.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np

LLAMA_FTYPE_MOSTLY_Q4_1 = 3


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """HF's rotate-half q/k rows -> GGML's interleaved RoPE order."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(lm_dir: str, path: str) -> None:
    """A float32 llama-architecture GGUF of the HF Llama checkpoint in lm_dir (tied head)."""
    import gguf
    from safetensors.numpy import load_file

    with open(os.path.join(lm_dir, "config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(lm_dir, "tokenizer.json")) as f:
        tok = json.load(f)
    weights = load_file(os.path.join(lm_dir, "model.safetensors"))
    w = {k.removeprefix("model."): v.astype(np.float32) for k, v in weights.items()}
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    writer = gguf.GGUFWriter(path + ".tmp", "llama")
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(cfg["hidden_size"] // heads)
    theta = cfg.get("rope_theta") or cfg.get("rope_parameters", {}).get("rope_theta", 10000.0)
    writer.add_rope_freq_base(float(theta))
    writer.add_layer_norm_rms_eps(float(cfg["rms_norm_eps"]))
    writer.add_file_type(0)  # all f32
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    special = {t["content"] for t in tok.get("added_tokens", []) if t.get("special")}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list([t for t, _ in vocab])
    writer.add_token_types([3 if t in special else 1 for t, _ in vocab])  # 3 = control, 1 = normal
    merges = tok["model"]["merges"]
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(cfg.get("bos_token_id", 1))
    writer.add_eos_token_id(cfg.get("eos_token_id", 2))
    writer.add_tensor("token_embd.weight", w["embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", w["norm.weight"])
    for i in range(cfg["num_hidden_layers"]):
        p = f"layers.{i}."
        writer.add_tensor(f"blk.{i}.attn_norm.weight", w[p + "input_layernorm.weight"])
        writer.add_tensor(f"blk.{i}.attn_q.weight", _permute(w[p + "self_attn.q_proj.weight"], heads))
        writer.add_tensor(f"blk.{i}.attn_k.weight", _permute(w[p + "self_attn.k_proj.weight"], kv_heads))
        writer.add_tensor(f"blk.{i}.attn_v.weight", w[p + "self_attn.v_proj.weight"])
        writer.add_tensor(f"blk.{i}.attn_output.weight", w[p + "self_attn.o_proj.weight"])
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", w[p + "post_attention_layernorm.weight"])
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", w[p + "mlp.gate_proj.weight"])
        writer.add_tensor(f"blk.{i}.ffn_up.weight", w[p + "mlp.up_proj.weight"])
        writer.add_tensor(f"blk.{i}.ffn_down.weight", w[p + "mlp.down_proj.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(path + ".tmp", path)


def quantize_q4_1(src: str, dst: str, threads: int = 2) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_FTYPE_MOSTLY_Q4_1
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(src.encode(), (dst + ".tmp").encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize failed ({rc}) on {src}")
    os.replace(dst + ".tmp", dst)


def cached_ggufs(cache: str) -> tuple[str, str]:
    """(f32, Q4_1) GGUFs of the SmolLM2-135M-Instruct directory in `cache`, written once."""
    lm = os.path.join(cache, "smollm2-135m-instruct")
    f32 = os.path.join(cache, "smollm2-135m-f32.gguf")
    q41 = os.path.join(cache, "smollm2-135m-q4_1.gguf")
    if not os.path.exists(f32):
        write_gguf(lm, f32)
    if not os.path.exists(q41):
        quantize_q4_1(f32, q41)
    return f32, q41


def prompt_ids(tokenizer_json: str, text: str, positions: int) -> list[int]:
    """`text` repeated and cut to `positions` tokens: llama.cpp gets as many prompt positions as
    the bundles' image + prompt prefill."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(tokenizer_json).encode(text * 8).ids[:positions]


def _llama(gguf_path: str, n_ctx: int, threads: int):
    """A fresh llama-cpp-python model with every position's logits kept (its score buffer)."""
    import llama_cpp

    llm = llama_cpp.Llama(
        gguf_path,
        n_ctx=n_ctx,
        n_threads=threads,
        n_threads_batch=threads,
        n_batch=512,
        logits_all=True,
        verbose=False,
    )
    llm.reset()
    return llm


def decode_speed(gguf_path: str, prompt_ids: list[int], new_tokens: int, threads: int = 2) -> dict:
    """Greedy decode after a prompt: -> {tokens, prefill_s, decode_tokens_per_s}. (logits_all: the
    Python binding reads logits from its score buffer; it only costs prefill time, not decode.)"""
    llm = _llama(gguf_path, len(prompt_ids) + new_tokens + 8, threads)
    t0 = time.perf_counter()
    llm.eval(prompt_ids)
    t1 = time.perf_counter()
    tokens = []
    for _ in range(new_tokens):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        tokens.append(token)
        llm.eval([token])
    t2 = time.perf_counter()
    llm.close()
    return {"tokens": tokens, "prefill_s": t1 - t0, "decode_tokens_per_s": new_tokens / (t2 - t1)}


def forced_logits(gguf_path: str, prompt_ids: list[int], forced: list[int], threads: int = 2) -> np.ndarray:
    """Logits [len(forced), vocab] that predicted each forced token after the prompt (teacher forcing)."""
    ids = list(prompt_ids) + list(forced)
    llm = _llama(gguf_path, len(ids) + 8, threads)
    llm.eval(ids)
    out = np.array(llm.scores[len(prompt_ids) - 1 : len(ids) - 1], dtype=np.float32)
    llm.close()
    return out
