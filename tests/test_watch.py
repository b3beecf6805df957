"""`nanovlm watch` and runtime.watch: the newest frame answered, frames dropped not queued, views
reused when they did not change (exactly, or within a threshold), answers as without reuse."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from runtime.pipeline import VLMPipeline
from runtime.watch import watch
from tests.conftest import export_lively
from tests.video_helpers import camera_frames, write_clip

pytest.importorskip("av")
PROMPT = "What moves?"


@pytest.fixture(scope="module")
def setup(tiny_tokenizer_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("watch")
    bundle = export_lively("replace", tiny_tokenizer_dir, d)[1]
    clips = {
        "static": write_clip(str(d / "static.mp4"), camera_frames(20, moving=False), fps=10),
        "moving": write_clip(str(d / "moving.mp4"), camera_frames(20, moving=True), fps=10),
        "noisy": write_clip(str(d / "noisy.mp4"), camera_frames(20, moving=False, noise=3), fps=10),
    }
    return VLMPipeline.from_bundle(bundle), bundle, clips


def _decoded(path):
    import av

    with av.open(path) as c:
        return [f.to_image().convert("RGB") for f in c.decode(video=0)]


def test_exact_reuse_answers_as_without_it(setup):
    """A still scene reuses every view after the first frame; a moving one re-encodes the views it
    changed. Every answer equals the runtime's alone on the same decoded frame (greedy, fp32)."""
    pipe, _, clips = setup
    for name, all_reused in (("static", True), ("moving", False)):
        frames = _decoded(clips[name])
        lines = list(watch(pipe, clips[name], PROMPT, max_new_tokens=6))
        assert len(lines) >= 10, len(lines)  # a tiny model keeps up with 10 fps
        assert [ln["frame"] for ln in lines] == sorted({ln["frame"] for ln in lines})
        for ln in lines:
            assert ln["answer"] == pipe.generate([frames[ln["frame"]]], PROMPT, max_new_tokens=6), ln
        later = lines[1:]
        assert lines[0]["reused_views"] == 0
        if all_reused:
            assert all(ln["reused_views"] == ln["views"] and ln["cached_tokens"] > 0 for ln in later)
        else:
            # the square moves every frame: never every view reused, but most frames keep some
            assert all(ln["reused_views"] < ln["views"] for ln in later)
            assert sum(ln["reused_views"] > 0 for ln in later) >= len(later) // 2, [
                ln["reused_views"] for ln in later
            ]
        assert max(ln["lag_s"] for ln in lines) < 1.0  # never behind by more than a few frames


def test_a_threshold_reuses_views_under_sensor_noise(setup):
    pipe, _, clips = setup
    exact = list(watch(pipe, clips["noisy"], PROMPT, max_new_tokens=4, max_answers=5))
    near = list(watch(pipe, clips["noisy"], PROMPT, max_new_tokens=4, max_answers=5, reuse_threshold=6))
    assert all(ln["reused_views"] < ln["views"] for ln in exact[1:])  # noise changes every view
    assert all(ln["reused_views"] == ln["views"] for ln in near[1:])


def test_every_and_on_change_skip_frames(setup):
    pipe, _, clips = setup
    still = list(watch(pipe, clips["static"], PROMPT, max_new_tokens=2, on_change=1.0))
    assert len(still) == 1  # a still scene costs one answer
    spaced = list(watch(pipe, clips["moving"], PROMPT, max_new_tokens=2, every=0.5))
    gaps = np.diff([ln["t"] for ln in spaced])
    assert len(spaced) >= 3 and (gaps >= 0.5 - 1e-6).all(), [ln["t"] for ln in spaced]


def test_a_busy_model_drops_frames_instead_of_queueing(setup, monkeypatch):
    """A model slower than the camera answers the newest frame each time: frames are skipped and
    the lag between a frame's time and its answer stays bounded."""
    import time

    pipe, _, clips = setup
    original = pipe.prepare

    def slow_prepare(*args, **kwargs):
        time.sleep(0.25)  # 2.5 frames' time at 10 fps
        return original(*args, **kwargs)

    monkeypatch.setattr(pipe, "prepare", slow_prepare)
    lines = list(watch(pipe, clips["moving"], PROMPT, max_new_tokens=2))
    frames = [ln["frame"] for ln in lines]
    # 20 frames at 10 fps against ~0.25 s an answer: about 8 answers, each past 2 or more frames
    # (the last may follow the one before closely: the file ended)
    assert len(lines) <= 12 and (np.diff(frames) >= 2).sum() >= len(frames) - 2, frames
    assert max(ln["lag_s"] for ln in lines) < 1.0


def test_the_cli_prints_a_json_line_per_answer(setup, tmp_path):
    _, bundle, clips = setup
    exe = os.path.join(os.path.dirname(sys.executable), "nanovlm")
    schema = tmp_path / "alert.json"
    schema.write_text(
        json.dumps({"type": "object", "properties": {"person": {"type": "boolean"}}, "required": ["person"]})
    )
    r = subprocess.run(
        [
            exe,
            "watch",
            bundle,
            clips["moving"],
            "--prompt",
            "Anyone?",
            "--max-answers",
            "3",
            "--json-schema",
            str(schema),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert len(lines) == 3 and {"t", "frame", "answer", "ttft_s", "total_s", "views", "reused_views"} <= set(
        lines[0]
    )
    for ln in lines:
        if ln["finish_reason"] == "stop":
            assert isinstance(json.loads(ln["answer"])["person"], bool)
    bad = subprocess.run(
        [exe, "watch", bundle, str(tmp_path / "none.mp4"), "--prompt", "x"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 1 and "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    assert Image  # PIL is what frames arrive as


def test_the_server_reuses_near_views_of_successive_frames(setup):
    """A chat sending a noisy still camera's frames one after another: with --reuse-threshold the
    second frame's prompt comes from the cache (cached_tokens), without it nothing past the text."""
    import openai

    from serve.process import ServerProcess
    from tests.serve_helpers import user

    _, bundle, _ = setup
    a, b = (Image.fromarray(f) for f in camera_frames(2, moving=False, noise=3))
    cached = {}
    for threshold in ("0", "6"):
        with ServerProcess(bundle, "--reuse-threshold", threshold) as s:
            c = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=60)
            for img in (a, b):
                r = c.chat.completions.create(model="x", messages=[user(PROMPT, img)], max_tokens=3)
            cached[threshold] = (r.usage.prompt_tokens_details.cached_tokens, r.usage.prompt_tokens)
    assert cached["0"][0] < 32 <= cached["6"][0], cached


def test_without_the_engine_a_frame_is_answered_whole(setup):
    """GPU backends have no engine (it moves KV on the host): a frame is answered by the pipeline,
    all views encoded, the same answer."""
    from runtime.watch import Frame, answer_frame

    pipe, _, _ = setup
    img = Image.fromarray(camera_frames(1)[0])
    line = answer_frame(pipe, None, Frame(img, 0.0, 0), PROMPT, 6)
    assert line["answer"] == pipe.generate([img], PROMPT, max_new_tokens=6)
    assert (
        line["reused_views"] == 0 and line["views"] == pipe.prepare([[img]], [PROMPT]).pixel_values.shape[0]
    )
