"""Our ViT and LanguageModel against transformers' independent implementations.

Tolerance: 1e-4 max abs on fp32 logits/hidden states for random small models. Both sides do the
same fp32 arithmetic in a different op order (fused vs separate qkv, SDPA kernels), so differences
are float32 rounding, ~1e-6 relative; 1e-4 leaves room for logits of magnitude ~10. The real
SmolLM2 (30 layers, logits ~20) gets 1e-3: the same relative error on 30 layers and larger logits.
"""

import pytest
import torch

from nanovlm.language_model import LanguageModel
from nanovlm.vision_transformer import ViT
from tests.conftest import TINY_SIGLIP, tiny_config

transformers = pytest.importorskip("transformers")


def _hf_siglip(tmp_path):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    hf_cfg = SiglipVisionConfig(**TINY_SIGLIP, layer_norm_eps=1e-6)
    torch.manual_seed(0)
    hf = SiglipVisionModel(hf_cfg).eval()
    with torch.no_grad():  # random, non-trivial norms and biases
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf.save_pretrained(tmp_path / "siglip")
    return hf


def test_vit_matches_siglip(tmp_path):
    hf = _hf_siglip(tmp_path)
    cfg = tiny_config(vit_model_type=str(tmp_path / "siglip"), vit_hidden_dim=4, vit_n_blocks=7)
    ours = ViT.from_hf(cfg).eval()
    assert cfg.vit_hidden_dim == 48 and cfg.vit_n_blocks == 2  # taken from the backbone
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        ref = hf(pixel_values=x).last_hidden_state
        got = ours(x)
    assert (ref - got).abs().max().item() <= 1e-4


def _hf_llama(tmp_path, tie: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(1)
    hf = LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf.save_pretrained(tmp_path / "llama")
    return hf


def _our_logits(lm: LanguageModel, ids: torch.Tensor) -> torch.Tensor:
    hidden, _ = lm(lm.token_embedding(ids))
    return lm.head(hidden)


@pytest.mark.parametrize("tie", [True, False])
def test_lm_matches_llama(tmp_path, tie):
    hf = _hf_llama(tmp_path, tie)
    cfg = tiny_config(lm_model_type=str(tmp_path / "llama"))
    ours = LanguageModel.from_hf(cfg).eval()
    assert cfg.lm_base_vocab_size == 300 and cfg.lm_vocab_size == 366
    ids = torch.randint(0, 300, (2, 17))
    with torch.no_grad():
        ref = hf(ids).logits
        got = _our_logits(ours, ids)[..., :300]
    assert (ref - got).abs().max().item() <= 1e-4
    # identical greedy continuations
    with torch.no_grad():
        hf_out = hf.generate(ids[:1], max_new_tokens=12, do_sample=False, pad_token_id=0)[0, 17:]
        seq = ids[:1]
        for _ in range(12):
            nxt = _our_logits(ours, seq)[:, -1, :300].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    assert seq[0, 17:].tolist() == hf_out.tolist()


@pytest.mark.slow
def test_lm_matches_real_smollm2(smollm2_dir):
    from transformers import AutoTokenizer, LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(smollm2_dir).eval()
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    cfg = tiny_config(lm_model_type=smollm2_dir)
    ours = LanguageModel.from_hf(cfg).eval()
    text = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    ids = torch.tensor([tok.encode(text)])
    with torch.no_grad():
        ref = hf(ids).logits
        got = _our_logits(ours, ids)[..., : ref.shape[-1]]
        assert (ref - got).abs().max().item() <= 1e-3
        hf_out = hf.generate(ids, max_new_tokens=16, do_sample=False)[0, ids.shape[1] :].tolist()
        seq = ids
        for _ in range(16):
            seq = torch.cat([seq, _our_logits(ours, seq)[:, -1, : ref.shape[-1]].argmax(-1, keepdim=True)], 1)
    # transformers stops at <|im_end|>; compare the tokens it produced
    assert seq[0, ids.shape[1] :].tolist()[: len(hf_out)] == hf_out
    assert "Paris" in tok.decode(hf_out)


def test_vlm_from_backbones_extends_vocabulary(tmp_path):
    hf_vit = _hf_siglip(tmp_path)
    hf_lm = _hf_llama(tmp_path, tie=True)
    from nanovlm.vision_language_model import VisionLanguageModel

    cfg = tiny_config(vit_model_type=str(tmp_path / "siglip"), lm_model_type=str(tmp_path / "llama"))
    vlm = VisionLanguageModel(cfg, load_backbone=True).eval()
    emb = vlm.decoder.token_embedding.weight
    assert emb.shape == (300 + 66, 64)
    assert torch.equal(emb[:300], hf_lm.model.embed_tokens.weight)
    assert emb[300:].std().item() == pytest.approx(0.02, rel=0.3)  # fresh rows for the image tokens
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(vlm.vision_encoder(x), hf_vit(pixel_values=x).last_hidden_state, atol=1e-4)
