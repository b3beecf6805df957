"""The torch-free runtime against the PyTorch reference, on exported random models."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from core.processors import ImageProcessor, prepare_batch
from core.sampling import Sampler, SamplingConfig
from runtime.pipeline import VLMPipeline
from tests.conftest import REPO, export_lively
from trt.plan import trt_profile_shapes

skimage_data = pytest.importorskip("skimage.data")


@pytest.fixture(scope="module", params=["replace", "prefix", "replace-fused"])
def pipe(request, tiny_tokenizer_dir, tmp_path_factory):
    """Every runtime test runs on both decoder graphs; the fused one keeps its KV cache in place."""
    placement, _, fused = request.param.partition("-")
    m, bundle = export_lively(
        placement, tiny_tokenizer_dir, tmp_path_factory.mktemp("rt"), fused or "standard"
    )
    p = VLMPipeline.from_bundle(bundle)
    assert p.backend.kv_in_place == bool(fused)
    return m, p, bundle


def _photos():
    return [
        Image.fromarray(skimage_data.astronaut()),
        Image.fromarray(skimage_data.coffee()),
        Image.fromarray(skimage_data.chelsea()),
    ]


def _reference(m, images, prompts, n):
    batch = prepare_batch(m.cfg, m.tokenizer, ImageProcessor.from_config(m.cfg), images, prompts)
    out = m.generate(
        torch.from_numpy(batch.input_ids),
        torch.from_numpy(batch.pixel_values),
        attention_mask=torch.from_numpy(batch.attention_mask),
        max_new_tokens=n,
    )
    eos = m.tokenizer.eos_token_id
    rows = []
    for r in out.tolist():
        rows.append(m.tokenizer.decode(r[: r.index(eos)] if eos in r else r))
    return rows


def test_greedy_equals_pytorch_single_and_batch(pipe):
    m, p, _ = pipe
    photos = _photos()
    if m.cfg.image_placement == "prefix":
        items = [([photos[0]], "What is it?"), ([photos[1]], "Describe the colours."), ([photos[2]], "Cat?")]
    else:  # several images and tiles per prompt
        items = [
            ([photos[0], photos[1]], "What is it?"),
            ([photos[1]], "Describe the colours."),
            ([photos[2]], "Cat?"),
        ]
    ref = _reference(m, [i for i, _ in items], [q for _, q in items], 16)
    assert p.generate_batch(items, max_new_tokens=16) == ref
    for (imgs, q), r in zip(items, ref, strict=True):
        assert p.generate(imgs, q, max_new_tokens=16) == r
    assert any(r for r in ref)


def test_streaming_equals_non_streaming(pipe):
    _, p, _ = pipe
    img = _photos()[0]
    pieces = list(p.stream(img, "What is it?", max_new_tokens=20))
    assert "".join(pieces) == p.generate(img, "What is it?", max_new_tokens=20)
    t = p.last_timings
    assert t.new_tokens >= 1 and t.image_encode_s > 0 and t.prefill_s > 0


def test_stop_strings(pipe):
    """A stop string taken from the middle of a greedy answer cuts the answer just before it,
    streamed or not (the first photo/prompt pair whose answer is long enough to cut)."""
    _, p, _ = pipe
    pairs = [(img, q) for img in _photos() for q in ("Describe.", "What is it?")]
    answers = [(img, q, p.generate(img, q, max_new_tokens=24)) for img, q in pairs]
    long = [(img, q, a) for img, q, a in answers if len(a) >= 4]
    assert long, [a for _, _, a in answers]
    img, q, full = long[0]
    stop = full[2:4]
    cut = p.generate(img, q, max_new_tokens=24, stop=[stop])
    assert cut == full[: full.index(stop)]
    assert "".join(p.stream(img, q, max_new_tokens=24, stop=[stop])) == cut


def test_chat_turn(pipe):
    m, p, _ = pipe
    img = _photos()[2]
    a = p.chat(img, [("What is it?", "a cat")], "What colour?", max_new_tokens=8)
    batch = prepare_batch(
        m.cfg,
        m.tokenizer,
        ImageProcessor.from_config(m.cfg),
        [[img]],
        ["What colour?"],
        [[("What is it?", "a cat")]],
    )
    out = m.generate(
        torch.from_numpy(batch.input_ids), torch.from_numpy(batch.pixel_values), max_new_tokens=8
    )
    ids = out[0].tolist()
    eos = m.tokenizer.eos_token_id
    assert a == m.tokenizer.decode(ids[: ids.index(eos)] if eos in ids else ids)


def test_seeded_sampling_reproducible(pipe):
    _, p, _ = pipe
    img = _photos()[0]
    a = p.generate(img, "Hi?", max_new_tokens=12, sampling=SamplingConfig(temperature=1.5, seed=3))
    b = p.generate(img, "Hi?", max_new_tokens=12, sampling=SamplingConfig(temperature=1.5, seed=3))
    assert a == b


def test_bad_inputs(pipe, tmp_path):
    _, p, bundle = pipe
    with pytest.raises(ValueError, match="exceeds the model's context of 512"):
        p.generate(_photos()[0], "Hi?", max_new_tokens=600)
    with pytest.raises(ValueError, match="empty prompt"):
        p.generate(_photos()[0], "   ")
    (tmp_path / "x.jpg").write_bytes(b"nope")
    with pytest.raises(ValueError, match="not a readable image"):
        p.generate(str(tmp_path / "x.jpg"), "Hi?")
    with pytest.raises(ValueError, match="unknown provider 'npu'"):
        VLMPipeline.from_bundle(bundle, provider="npu")
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(RuntimeError, match="install onnxruntime-gpu"):
            VLMPipeline.from_bundle(bundle, provider="cuda")


def test_sampler_rules():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], np.float32))
    assert Sampler(SamplingConfig())(logits).tolist() == [0]
    draws = {int(Sampler(SamplingConfig(temperature=1.0, top_k=2, seed=s))(logits)[0]) for s in range(60)}
    assert draws == {0, 1}
    draws = {int(Sampler(SamplingConfig(temperature=1.0, top_p=0.6, seed=s))(logits)[0]) for s in range(60)}
    assert draws == {0, 1}  # 0.5 alone does not reach 0.6; 0.5 + 0.3 does
    pen = Sampler(SamplingConfig(repetition_penalty=10.0))(np.array([[2.0, 1.0]], np.float32), [[0]])
    assert pen.tolist() == [1]
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0)


def test_trt_profiles_from_manifest(pipe):
    _, p, _ = pipe
    prof = trt_profile_shapes(p.bundle, max_batch=4, max_context=512, max_images=8)
    dec = prof["decoder"]
    assert "past_key_values.0.key:1x2x0x16" in dec["trt_profile_min_shapes"]
    assert "input_ids:4x512" in dec["trt_profile_max_shapes"]
    assert "image_embeds:128x64" in dec["trt_profile_max_shapes"]  # 4 prompts x 8 images x 4 tokens
    assert prof["vision_encoder"]["trt_profile_max_shapes"] == "pixel_values:8x3x32x32"


def test_runtime_runs_without_torch(pipe, tmp_path):
    """A fresh interpreter where importing torch or transformers fails, running a full generation."""
    _, p, bundle = pipe
    expected = p.generate(_photos()[0], "What is it?", max_new_tokens=10)
    _photos()[0].save(tmp_path / "a.png")
    code = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "transformers"):
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        from runtime.pipeline import VLMPipeline
        p = VLMPipeline.from_bundle({bundle!r})
        print(p.generate({str(tmp_path / "a.png")!r}, "What is it?", max_new_tokens=10), end="")
        assert not any(m.split(".")[0] in ("torch", "transformers") for m in sys.modules)
    """)
    res = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=REPO),
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout == expected


@pytest.mark.slow
def test_runtime_equals_pytorch_on_a_trained_model(trained_tiny, tmp_path):
    """A briefly trained default model (shapes data): runtime tokens equal PyTorch tokens."""
    from core.shapes_dataset import ShapesDataset
    from export.onnx_export import export_onnx
    from nanovlm.vision_language_model import VisionLanguageModel
    from runtime.pipeline import GenerationRequest

    ckpt = trained_tiny
    export_onnx(ckpt, str(tmp_path / "bundle"))
    m = VisionLanguageModel.from_pretrained(ckpt)
    p = VLMPipeline.from_bundle(str(tmp_path / "bundle"))
    ds = ShapesDataset("test")
    samples = [ds[i] for i in range(24)]
    batch = prepare_batch(
        m.cfg,
        m.tokenizer,
        ImageProcessor.from_config(m.cfg),
        [[s.image] for s in samples],
        [s.question for s in samples],
    )
    ref = m.generate(
        torch.from_numpy(batch.input_ids),
        torch.from_numpy(batch.pixel_values),
        attention_mask=torch.from_numpy(batch.attention_mask),
        max_new_tokens=6,
    )
    got = np.stack(list(p.generate_ids(batch, GenerationRequest(max_new_tokens=6))), axis=1)
    assert got.tolist() == ref.tolist()


def _nanovlm_transforms(cfg, image: Image.Image) -> tuple[np.ndarray, tuple[int, int]]:
    """nanoVLM's own image pipeline, step by step as its torchvision Compose runs it: Resize
    (bicubic, on the PIL image) or DynamicResize, ToTensor, then GlobalAndSplitImages (tiles cut
    row-major, a global view resized by torchvision's tensor resize, i.e. torch's antialiased
    bilinear interpolate). torchvision itself cannot be installed here: its PyPI wheel links the
    CUDA build of torch, so the steps are written with the torch calls torchvision makes."""
    import torch.nn.functional as F

    tile = cfg.vit_img_size
    if cfg.image_placement == "prefix":
        h, w = tile, tile
    else:
        h, w = ImageProcessor.from_config(cfg).target_size(image.height, image.width)
    x = (
        torch.from_numpy(np.array(image.resize((w, h), Image.BICUBIC)))
        .permute(2, 0, 1)
        .float()
        .div(255)[None]
    )
    n_h, n_w = h // tile, w // tile
    tiles = x.reshape(1, 3, n_h, tile, n_w, tile).permute(0, 2, 4, 1, 3, 5).reshape(n_h * n_w, 3, tile, tile)
    if (n_h, n_w) != (1, 1):
        global_view = F.interpolate(
            x, size=[tile, tile], mode="bilinear", align_corners=False, antialias=True
        )
        tiles = torch.cat([global_view, tiles])
    return tiles.numpy(), (n_h, n_w)


def _nanovlm_image_string(cfg, grid: tuple[int, int]) -> str:
    """nanoVLM's get_image_string for one image."""
    extra, tokens = cfg.vlm_extra_tokens, cfg.vlm_extra_tokens["image_token"] * cfg.mp_image_token_length
    out = extra["global_image_token"] + tokens
    if grid != (1, 1):
        for i in range(grid[0]):
            for j in range(grid[1]):
                out += extra[f"r{i + 1}c{j + 1}"] + tokens
    return out


def test_runtime_inputs_match_nanovlms_transforms_and_transformers_tokenizer(pipe):
    """Real photos of different sizes and aspect ratios: the runtime's pixels equal nanoVLM's
    transforms (tiles bit for bit; the global view to 1e-6, float32 rounding of two bilinear
    implementations: 2.4e-7 measured), and its token ids equal transformers' tokenizer on the
    chat template transformers renders itself."""
    from transformers import PreTrainedTokenizerFast

    m, p, bundle = pipe
    cfg = m.cfg
    hf_tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(bundle, "tokenizer.json"))
    photos = _photos() + [
        Image.fromarray(skimage_data.rocket()),
        Image.fromarray(skimage_data.camera()).convert("RGB"),
    ]
    assert len({im.size for im in photos}) >= 3  # 512x512, 400x400, 451x300, 640x427
    grids = set()
    for im in photos:
        ours = p.prepare([[im]], ["What is it?"])
        ref, grid = _nanovlm_transforms(cfg, im)
        grids.add(grid)
        assert ours.pixel_values.shape == ref.shape
        n_tiles = grid[0] * grid[1]
        assert np.array_equal(ours.pixel_values[-n_tiles:], ref[-n_tiles:])
        assert np.abs(ours.pixel_values - ref).max() <= 1e-6
        if cfg.image_placement == "prefix":
            ids = hf_tok("Question: What is it? Answer:", add_special_tokens=True).input_ids
        else:
            content = _nanovlm_image_string(cfg, grid) + "What is it?"
            ids = hf_tok.apply_chat_template(
                [{"role": "user", "content": content}],
                chat_template=cfg.lm_chat_template,
                add_generation_prompt=True,
                tokenize=True,
                return_dict=False,
            )
        assert ours.input_ids[0].tolist() == list(ids)
    if cfg.image_placement == "replace":
        assert any(g != (1, 1) for g in grids)  # the global view was compared too


def test_text_only_prompt(pipe):
    m, p, _ = pipe
    if m.cfg.image_placement == "prefix":
        with pytest.raises(ValueError, match="exactly one image per prompt"):
            p.generate([], "Hello?")
        return
    got = p.generate([], "Hello?", max_new_tokens=10)
    ids = torch.tensor([m.tokenizer.encode(p.prepare([[]], ["Hello?"]).prompts[0])])
    out = m.generate(ids, None, max_new_tokens=10)[0].tolist()
    eos = m.tokenizer.eos_token_id
    assert got == m.tokenizer.decode(out[: out.index(eos)] if eos in out else out)


def test_profile_dir_writes_a_node_profile_per_graph_and_keeps_answers(pipe, tmp_path):
    """OrtBackend(profile_dir=...) (benchmarks/op_profile.py): one onnxruntime profile per graph
    in that directory, with its runs and MatMul kernel times, and the same greedy answer."""
    _, p, bundle = pipe
    images, prompt = [_photos()[0]], "What is in the picture?"
    profiled = VLMPipeline.from_bundle(bundle, profile_dir=str(tmp_path))
    assert profiled.generate(images, prompt, max_new_tokens=6) == p.generate(images, prompt, max_new_tokens=6)
    for graph, session in profiled.backend.sessions.items():
        path = session.end_profiling()
        assert os.path.dirname(path) == str(tmp_path) and os.path.basename(path).startswith(graph)
        with open(path) as f:
            events = json.load(f)
        runs = [e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"]
        kernels = {
            e["args"]["op_name"]
            for e in events
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")
        }
        assert runs and "MatMul" in "".join(kernels), (graph, len(runs), kernels)
