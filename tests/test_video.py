"""Video input: SmolVLM2's frame sampling, sizes, timestamped prompt and answers against transformers
on a tiny checkpoint written by its own save_pretrained; any other bundle sees the frames as images."""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from core.video import StreamInfo, Video, VideoSettings, number_words, probe, sample_indices
from runtime.pipeline import VLMPipeline
from tests.conftest import REPO, export_lively
from tests.video_helpers import camera_frames, write_clip

pytest.importorskip("av")
BIN = os.path.dirname(sys.executable)
TORCHVISION = os.path.join(os.path.dirname(BIN), "torchvision")  # make setup puts it there, off the path
QUESTION = "What happens in the video?"


def transformers_video(*args: str) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([TORCHVISION, REPO]))
    r = subprocess.run(
        [sys.executable, os.path.join(REPO, "tests", "transformers_video.py"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.fixture(scope="module")
def smolvlm2(tmp_path_factory):
    """A tiny SmolVLM2 checkpoint (transformers' save_pretrained) and its bundle."""
    if not os.path.isdir(os.path.join(TORCHVISION, "torchvision")):
        pytest.skip(
            f"transformers' SmolVLM2 processor needs torchvision in {TORCHVISION} (make setup installs it)"
        )
    from export.onnx_export import export_onnx

    d = tmp_path_factory.mktemp("smolvlm2")
    transformers_video("write", str(d / "ckpt"))
    export_onnx(str(d / "ckpt"), str(d / "bundle"), decoder="fused")
    return d


@pytest.mark.parametrize(
    "seconds, fps", [(4.0, 10), (12.5, 24), (0.3, 10)], ids=["4s", "12.5s-skips-ends", "short"]
)
def test_prompt_pixels_and_greedy_answer_equal_transformers(smolvlm2, seconds, fps):
    """Frames sampled at the same indices, the same token ids (timestamps and frame count in
    words), pixels within one 8-bit level (PIL's LANCZOS against torchvision's uint8 one, which
    round differently in ~0.3% of values), and the same greedy answer as transformers' generate."""
    clip = write_clip(str(smolvlm2 / f"clip{seconds}.mp4"), camera_frames(int(seconds * fps), noise=4), fps)
    ref = smolvlm2 / f"ref{seconds}.npz"
    transformers_video("reference", str(smolvlm2 / "ckpt"), clip, QUESTION, str(ref))
    r = np.load(ref)
    pipe = VLMPipeline.from_bundle(str(smolvlm2 / "bundle"))
    video = pipe.load_video(clip)
    batch = pipe.prepare([[video]], [QUESTION])
    assert video.indices == r["indices"].tolist()
    assert batch.input_ids[0].tolist() == r["input_ids"][0].tolist(), (batch.prompts[0], str(r["text"]))
    diff = np.abs(batch.pixel_values - r["pixel_values"][0])
    level = 1 / 255 / 0.5  # one 8-bit level after normalising with std 0.5
    assert diff.max() <= level * 1.001 and (diff > 1e-5).mean() < 0.01, (diff.max(), (diff > 1e-5).mean())
    answer = pipe.generate(video=video, prompt=QUESTION, max_new_tokens=12)
    assert answer == pipe.tokenizer.decode(r["new_tokens"].tolist())


def test_frame_sampling_equals_transformers():
    """sample_indices against SmolVLMVideoProcessor.sample_frames (it builds without torchvision)."""
    from transformers.models.smolvlm.video_processing_smolvlm import SmolVLMVideoProcessor
    from transformers.video_utils import VideoMetadata

    for fps, max_frames in [(1.0, 64), (2.0, 6), (0.5, 8)]:
        vp = SmolVLMVideoProcessor(
            video_sampling={"fps": fps, "max_frames": max_frames, "video_size": {"longest_edge": 48}}
        )
        s = VideoSettings(fps, max_frames, 48)
        for frames, rate in [(1, 30.0), (40, 10.0), (125, 25.0), (3000, 29.97), (900, 30.0), (7, 24.0)]:
            info = StreamInfo(frames, rate, 64, 48)
            meta = VideoMetadata(
                total_num_frames=frames, fps=rate, duration=frames / rate, width=64, height=48
            )
            assert sample_indices(info, s).tolist() == vp.sample_frames(meta).tolist(), (fps, frames, rate)


def test_frame_counts_in_words_equal_num2words():
    num2words = pytest.importorskip("num2words").num2words
    assert [number_words(n) for n in range(1000)] == [num2words(n) for n in range(1000)]


def test_a_nanovlm_bundle_sees_a_videos_frames_as_images(tiny_tokenizer_dir, tmp_path):
    """Any bundle takes a video: its sampled frames go in as images, one view each."""
    bundle = export_lively("replace", tiny_tokenizer_dir, tmp_path)[1]
    pipe = VLMPipeline.from_bundle(bundle)
    frames = camera_frames(3, size=(48, 40))
    video = Video.from_frames(frames, fps=1.0)
    one_view = [Image.fromarray(f).resize((32, 32), Image.BICUBIC) for f in frames]  # what one tile sees
    expected = pipe.generate(one_view, "What happens?", max_new_tokens=8)
    assert pipe.generate(video=video, prompt="What happens?", max_new_tokens=8) == expected
    clip = write_clip(str(tmp_path / "clip.mp4"), camera_frames(30, size=(48, 40)), fps=10)
    info = probe(clip)
    assert (info.frames, info.fps, info.width, info.height) == (30, 10.0, 48, 40)
    r = subprocess.run(
        [os.path.join(BIN, "nanovlm"), "run", bundle, "--video", clip, "--prompt", "What happens?"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0 and r.stdout.strip(), r.stderr
    with pytest.raises(ValueError, match="images or a video, not both"):
        pipe.generate(frames[:1], "x", video=video)


def test_a_file_that_is_not_a_video_is_one_line(tmp_path, tiny_tokenizer_dir):
    bundle = export_lively("replace", tiny_tokenizer_dir, tmp_path)[1]
    bad = tmp_path / "notes.mp4"
    bad.write_text("not a video")
    r = subprocess.run(
        [os.path.join(BIN, "nanovlm"), "run", bundle, "--video", str(bad), "--prompt", "x"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [f"Error: {bad}: not a readable video (InvalidDataError)"]


# ----------------------------------------------------------------------------- the server


def _video_part(path: str) -> dict:
    import base64

    with open(path, "rb") as f:
        url = "data:video/mp4;base64," + base64.b64encode(f.read()).decode()
    return {"type": "video_url", "video_url": {"url": url}}


def test_the_server_answers_a_video_url_like_the_runtime(tiny_tokenizer_dir, tmp_path):
    """A video_url part (data: URL, or file:// under --media-dir) answers as pipe.generate(video=...);
    a second request with the same video reuses its frames (the prefix cache says so); budgets on
    duration, frame pixels and mixing refuse before any frame is decoded."""
    import openai

    from serve.process import ServerProcess

    bundle = export_lively("replace", tiny_tokenizer_dir, tmp_path)[1]
    media = tmp_path / "media"
    media.mkdir()
    clip = write_clip(str(media / "clip.mp4"), camera_frames(40, size=(48, 40)), fps=10)
    long_clip = write_clip(
        str(tmp_path / "long.mp4"), camera_frames(200, size=(48, 40), moving=False), fps=10
    )
    big = write_clip(str(tmp_path / "big.mp4"), camera_frames(4, size=(640, 480), moving=False), fps=2)
    pipe = VLMPipeline.from_bundle(bundle)
    expected = pipe.generate(video=clip, prompt="What happens?", max_new_tokens=8)
    with ServerProcess(
        bundle, "--media-dir", str(media), "--max-video-seconds", "10", "--max-image-pixels", "100000"
    ) as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=120)

        def ask(part, text="What happens?"):
            return c.chat.completions.create(
                model="x",
                max_tokens=8,
                messages=[{"role": "user", "content": [part, {"type": "text", "text": text}]}],
            )

        first = ask(_video_part(clip))
        assert first.choices[0].message.content == expected
        again = ask({"type": "video_url", "video_url": {"url": f"file://{clip}"}})
        assert again.choices[0].message.content == expected
        assert again.usage.prompt_tokens_details.cached_tokens >= again.usage.prompt_tokens - 8
        for part, words in [
            (_video_part(long_clip), "over 10 s"),
            (_video_part(big), "above the limit of 100000 pixels"),
            (
                {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,aGVsbG8="}},
                "not a readable video",
            ),
            ({"type": "video_url", "video_url": {"url": f"file://{long_clip}"}}, "outside the allowed"),
        ]:
            with pytest.raises(openai.BadRequestError, match=words):
                ask(part)
        with pytest.raises(openai.BadRequestError, match="a video goes alone"):
            c.chat.completions.create(
                model="x",
                messages=[
                    {
                        "role": "user",
                        "content": [
                            _video_part(clip),
                            {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}},
                            {"type": "text", "text": "x"},
                        ],
                    }
                ],
            )
