import json
import logging

import pytest

from core.config import V02_ONLY_KEYS, VLMConfig
from tests.conftest import tiny_config


def test_json_round_trip(tmp_path):
    cfg = tiny_config()
    cfg.save(tmp_path / "config.json")
    assert VLMConfig.load(tmp_path / "config.json") == cfg


def test_prefix_round_trip_writes_only_v01_keys(tmp_path):
    cfg = tiny_config("prefix")
    assert cfg.image_placement == "prefix"
    cfg.save(tmp_path / "config.json")
    data = json.loads((tmp_path / "config.json").read_text())
    assert not set(V02_ONLY_KEYS) & set(data)
    again = VLMConfig.load(tmp_path / "config.json")
    assert again == cfg and again.image_placement == "prefix"


def test_unknown_and_retired_keys_warn(caplog, tmp_path):
    data = tiny_config().to_dict() | {"lm_eos_token_id": 0, "something_new": 1}
    (tmp_path / "c.json").write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING):
        cfg = VLMConfig.load(tmp_path / "c.json")
    assert "lm_eos_token_id" in caplog.text and "something_new" in caplog.text
    assert cfg == tiny_config()


def test_missing_keys_take_defaults():
    cfg = VLMConfig.from_dict({"vlm_extra_tokens": VLMConfig().vlm_extra_tokens})
    assert cfg == VLMConfig()


def test_inconsistent_image_token_length_raises():
    with pytest.raises(ValueError, match="mp_image_token_length=10"):
        tiny_config(mp_image_token_length=10)


@pytest.mark.parametrize(
    "override, needle",
    [
        ({"lm_n_heads": 5}, "lm_hidden_dim=64 is not divisible by lm_n_heads=5"),
        ({"lm_n_kv_heads": 3}, "lm_n_heads=4 is not divisible by lm_n_kv_heads=3"),
        ({"vit_img_size": 36}, "vit_img_size=36 is not a multiple of vit_patch_size=8"),
        ({"lm_vocab_size": 320}, "lm_vocab_size=320 cannot hold"),
    ],
)
def test_other_inconsistencies_raise(override, needle):
    with pytest.raises(ValueError, match=needle):
        tiny_config(**override)


def test_nanovlm_222m_style_config_is_prefix(tmp_path):
    # The keys of lusxvr/nanoVLM-222M's config.json (nanoVLM v0.1), including the retired eos id.
    v01 = {
        "vit_hidden_dim": 768,
        "vit_inter_dim": 3072,
        "vit_patch_size": 16,
        "vit_img_size": 224,
        "vit_n_heads": 12,
        "vit_dropout": 0.0,
        "vit_n_blocks": 12,
        "vit_ln_eps": 1e-06,
        "vit_cls_flag": False,
        "vit_model_type": "google/siglip-base-patch16-224",
        "lm_hidden_dim": 576,
        "lm_inter_dim": 1536,
        "lm_rms_eps": 1e-05,
        "lm_re_base": 100000,
        "lm_max_position_embeddings": 8192,
        "lm_vocab_size": 49152,
        "lm_n_heads": 9,
        "lm_n_kv_heads": 3,
        "lm_dropout": 0.0,
        "lm_n_blocks": 30,
        "lm_attn_scaling": 1.0,
        "lm_eos_token_id": 0,
        "lm_max_length": 79,
        "lm_use_tokens": False,
        "lm_tie_weights": True,
        "lm_model_type": "HuggingFaceTB/SmolLM2-135M",
        "lm_tokenizer": "HuggingFaceTB/cosmo2-tokenizer",
        "mp_pixel_shuffle_factor": 2,
        "vlm_load_backbone_weights": True,
        "vlm_checkpoint_path": "checkpoints/nanoVLM-222M",
        "hf_repo_name": "nanoVLM-222M",
    }
    (tmp_path / "config.json").write_text(json.dumps(v01))
    cfg = VLMConfig.load(tmp_path / "config.json")
    assert cfg.image_placement == "prefix"
    assert cfg.image_token_count == 49 and cfg.lm_vocab_size == 49152


def test_bad_json_names_file(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        VLMConfig.load(tmp_path / "config.json")
