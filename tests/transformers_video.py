"""transformers' SmolVLM2 on a video, as a child process of the video tests (tests/test_video.py).

    python tests/transformers_video.py write DIR                         # a tiny SmolVLM2 checkpoint
    python tests/transformers_video.py reference DIR VIDEO QUESTION OUT  # its processor and generate

transformers builds SmolVLMProcessor and resizes video frames only with torchvision. torchvision's
PyPI wheels are CUDA builds: beside the CPU torch their native ops do not load, and torchvision
then fails at import registering fake kernels for two of those ops. Its image transforms are plain
torch, so this process declares the two ops' schemas first and torchvision imports (the Makefile
installs the wheel into .venv/torchvision, off the main environment's path: nothing else sees it).
The frames are decoded by transformers' own PyAV reader with the video processor's own sampler.
"""

from __future__ import annotations

import os
import sys

import torch

for op in ("nms", "qnms"):
    torch.library.define(f"torchvision::{op}", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

VIDEO = {"fps": 2.0, "max_frames": 6, "size": 48}  # 6 frames at most, 2 a second, long edge 48 then 32


def write(directory: str) -> None:
    from tests.test_idefics3 import write_idefics3

    write_idefics3(directory, tie=False, video=VIDEO)


def reference(directory: str, video: str, question: str, out: str) -> None:
    import numpy as np
    from transformers import AutoProcessor, SmolVLMForConditionalGeneration
    from transformers.video_utils import load_video

    processor = AutoProcessor.from_pretrained(directory)
    vp = processor.video_processor
    frames, metadata = load_video(
        video, backend="pyav", sample_indices_fn=lambda metadata, **_: vp.sample_frames(metadata)
    )
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(
        text=text, videos=[frames], video_metadata=[metadata], do_sample_frames=False, return_tensors="pt"
    )
    model = SmolVLMForConditionalGeneration.from_pretrained(directory).eval()
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    np.savez(
        out,
        input_ids=inputs["input_ids"].numpy(),
        pixel_values=inputs["pixel_values"].numpy(),
        indices=np.asarray(metadata.frames_indices),
        new_tokens=generated[0, inputs["input_ids"].shape[1] :].numpy(),
        text=np.asarray(processor.batch_decode(inputs["input_ids"])[0]),
    )


if __name__ == "__main__":
    if sys.argv[1] == "write":
        write(sys.argv[2])
    else:
        reference(*sys.argv[2:6])
