"""The nanoVLM-222M shape (SigLIP-B/16-224 + SmolLM2-135M) trains with the same code (slow tier).

No SigLIP weights are reachable offline, so the ViT starts random; the LM is the real
SmolLM2-135M-Instruct. A short projector-only run must lower the validation loss.
"""

import json

import pytest

from nanovlm.tools.smollm2 import nanovlm_222m_config
from nanovlm.train import train
from nanovlm.train_config import TrainConfig


@pytest.mark.slow
def test_projector_only_run_on_real_smollm2_lowers_val_loss(tmp_path, smollm2_dir):
    cfg = nanovlm_222m_config(smollm2_dir)
    cfg.save(tmp_path / "vlm.json")
    tc = TrainConfig(
        model=str(tmp_path / "vlm.json"),
        lr_mp=3e-3,
        lr_vision_backbone=0,
        lr_language_backbone=0,
        batch_size=8,
        max_training_steps=12,
        warmup_ratio=0.1,
        eval_interval=0,
        eval_samples=24,
        log_interval=1,
        checkpoint_interval=1000,
        shapes_image_size=224,
        output_dir=str(tmp_path / "run"),
    )
    train(tc)
    evals = [r for r in (json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")) if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 12]  # before training and after
    assert evals[1]["val_loss"] < evals[0]["val_loss"], evals
