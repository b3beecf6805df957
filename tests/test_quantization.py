"""Calibration data, the recorder, the TensorRT cache, quantize modes end to end, and validate."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from conftest import export_lively
from PIL import Image

from calibration.data import load_calibration
from calibration.quantize import quantize_bundle
from calibration.recorder import FeedReader, record_feeds
from cli.main import export_main as export_cli
from core.bundle import load_bundle
from core.recipes import QUANTIZE_MODES, RECIPES, gates_for
from evaluation import metrics, parity
from runtime.pipeline import VLMPipeline


@pytest.fixture(scope="module")
def lively(tiny_tokenizer_dir, tmp_path_factory):
    """Four decoder blocks: int4 keeps the first and last at 8 bits, so the middle two hold real
    4-bit MatMuls (rounded by GPTQ)."""
    d = tmp_path_factory.mktemp("lively")
    model, bundle = export_lively("replace", tiny_tokenizer_dir, d, blocks=4)
    return model, bundle, str(d / "ckpt")


@pytest.fixture(scope="module")
def quantized(lively, tmp_path_factory):
    """Every mode applied to the lively bundle (int8-static calibrated on the built-in data)."""
    _, bundle, _ = lively
    d = tmp_path_factory.mktemp("quantized")
    return {
        mode: (quantize_bundle(bundle, str(d / mode), mode, samples=8), str(d / mode))
        for mode in QUANTIZE_MODES
    }


def _photo_folder(tmp_path, n=3, broken=1):
    for i in range(n):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 50, 3), np.uint8)).save(
            tmp_path / f"{i}.png"
        )
    for i in range(broken):
        (tmp_path / f"broken{i}.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "prompts.txt").write_text("What is in the picture?\nDescribe the colours.\n")
    return tmp_path


# ----------------------------------------------------------------------------- calibration data
def test_calibration_sources(tmp_path):
    cal = load_calibration("builtin", 5)
    assert len(cal.samples) == 5 and all(len(s.images) == 1 and s.prompt.endswith("?") for s in cal.samples)
    assert cal.sha256() == load_calibration("builtin", 5).sha256()  # deterministic
    folder = load_calibration(str(_photo_folder(tmp_path)), 10)
    assert len(folder.samples) == 3 and folder.skipped == {"bad_image": 1}
    assert [s.prompt for s in folder.samples] == [
        "What is in the picture?",
        "Describe the colours.",
        "What is in the picture?",
    ]
    with pytest.raises(ValueError, match="gave 3 usable samples .* at least 8 are needed"):
        load_calibration(str(tmp_path), 10, minimum=8)
    with pytest.raises(ValueError, match="expected 'builtin', a folder"):
        load_calibration("no/such/place", 4)


def test_calibration_folder_takes_text_only_prompts_in_turn(tmp_path):
    folder = _photo_folder(tmp_path, broken=0)
    (folder / "texts.txt").write_text(
        "Tell me a joke.\n\nWhy is the sea salty?\nCount to five.\nName a bird.\n"
    )
    cal = load_calibration(str(folder), 10)
    assert [(len(s.images), s.prompt) for s in cal.samples] == [
        (1, "What is in the picture?"),
        (0, "Tell me a joke."),
        (1, "Describe the colours."),
        (0, "Why is the sea salty?"),
        (1, "What is in the picture?"),
        (0, "Count to five."),
        (0, "Name a bird."),
    ]
    assert [len(s.images) for s in load_calibration(str(folder), 3).samples] == [1, 0, 1]
    assert (
        load_calibration(str(folder), 10).sha256()
        == cal.sha256()
        != load_calibration(str(folder), 3).sha256()
    )


def test_gptq_beats_rounding_on_correlated_inputs():
    """GPTQ's output error ||X (W - Q)|| on held-out activations drawn like the calibration ones
    is well below that of the importance-weighted rounding it refines (measured: 0.55x), and what
    it stores is still plain MatMulNBits blocks: every weight an integer in [-8, 7] times its
    block's scale. Per output channel at 8 bits (int8-static's grid) likewise against plain
    rounding with the same scales (measured: 0.42x)."""
    from calibration.blockwise import dequantize_blocks, quantize_blocks
    from calibration.gptq import gptq_blocks, gptq_channels

    rng = np.random.default_rng(0)
    K, N, rows = 256, 128, 2000
    mix = rng.standard_normal((K, K)) * 0.3 + np.eye(K)

    def activations():
        x = rng.standard_normal((rows, K)) @ mix
        x[:, [3, 77]] *= 20  # outlier channels, as in SmolLM2
        return x

    x, held_out = activations(), activations()
    w = (rng.standard_t(4, (K, N)) * 0.02).astype(np.float32)
    gram = x.T @ x / rows

    def error(packed, scales):
        return np.mean((held_out @ (w - dequantize_blocks(packed, scales, 4, K))) ** 2) / np.mean(
            (held_out @ w) ** 2
        )

    packed, scales = gptq_blocks(w, gram, 4, 32)
    assert error(packed, scales) < 0.7 * error(*quantize_blocks(w, 4, 32, np.diag(gram).astype(np.float32)))
    q = dequantize_blocks(packed, scales, 4, K).T.reshape(N, K // 32, 32) / scales[..., None]
    assert np.abs(q - np.rint(q)).max() < 1e-3 and q.min() >= -8 - 1e-3 and q.max() <= 7 + 1e-3
    with pytest.raises(ValueError, match="gram has shape \\(4, 4\\), expected \\(256, 256\\)"):
        gptq_blocks(w, np.eye(4), 4, 32)
    with pytest.raises(ValueError, match="K \\(250\\) to be a multiple of the block \\(32\\)"):
        gptq_blocks(w[:250], gram[:250, :250], 4, 32)

    # per output channel (int8-static): the same loop with one fixed scale per column
    q8, s8 = gptq_channels(w, gram)
    rtn = np.clip(np.rint(w / s8), -127, 127)
    assert q8.dtype == np.int8 and np.abs(q8).max() == 127 and s8.shape == (N,)
    assert np.array_equal(s8, (np.abs(w).max(0) / 127).astype(np.float32))
    held = lambda wq: np.mean((held_out @ (w - wq)) ** 2) / np.mean((held_out @ w) ** 2)  # noqa: E731
    assert held(q8 * s8) < 0.7 * held(rtn * s8)


def test_activation_grams_agree_with_the_importance(lively):
    """diag(X^T X / rows) is the mean squared activation the importance already measures."""
    from calibration.importance import activation_importance
    from calibration.nbits import weight_matmuls

    _, bundle, _ = lively
    b = load_bundle(bundle)
    _, feeds = record_feeds(b, load_calibration("builtin", 2), 2)
    wanted = [n.name for n in weight_matmuls(onnx.load(b.graph_path("decoder")))][:3]
    importance, grams = activation_importance(b.graph_path("decoder"), feeds, lambda name: name in wanted)
    assert sorted(grams) == sorted(wanted)
    for name in wanted:
        np.testing.assert_allclose(np.diag(grams[name]), importance[name], rtol=1e-5)


def test_hf_records_are_counted_not_fatal():
    from calibration.data import _from_records

    img = Image.new("RGB", (20, 20), (255, 0, 0))
    records = [
        {"images": [img], "texts": [{"user": "What colour?", "assistant": "red"}]},
        {"images": [], "texts": [{"user": "No image?", "assistant": "none"}]},
        {"images": [img], "texts": []},
        {"images": [{"bytes": b"garbage", "path": None}], "texts": [{"user": "Broken?", "assistant": "yes"}]},
    ]
    cal = _from_records("hf:test", iter(records), 10)
    assert [s.prompt for s in cal.samples] == ["What colour?"]
    assert cal.skipped == {"no_image": 1, "no_prompt": 1, "bad_image": 1}


def test_recorder_sees_real_prefill_and_decode_steps(lively):
    _, bundle, _ = lively
    b = load_bundle(bundle)
    cal = load_calibration("builtin", 3)
    vision, decoder = record_feeds(b, cal, decode_steps=2)
    tiles = vision[0]["pixel_values"].shape[0]  # a 128 px image at this config: global view + 2x2 tiles
    assert len(vision) == 3 and vision[0]["pixel_values"].shape == (5, 3, 32, 32)
    assert len(decoder) == 3 * 3  # per sample: prefill + 2 decode steps
    prefill, step1, step2 = decoder[:3]
    S = prefill["input_ids"].shape[1]
    assert prefill["past_key_values.0.key"].shape[2] == 0 and prefill["image_embeds"].shape[0] == tiles * 4
    assert step1["input_ids"].shape == (1, 1) and step1["past_key_values.0.key"].shape[2] == S
    assert step2["past_key_values.1.value"].shape[2] == S + 1 and step2["attention_mask"].shape[1] == S + 2
    assert np.abs(step2["past_key_values.1.value"]).sum() > 0  # real caches, not zeros
    reader = FeedReader(decoder)
    assert sum(1 for _ in iter(reader.get_next, None)) == 9
    reader.rewind()
    assert reader.get_next() is decoder[0]


def test_smoothquant_keeps_the_fp32_function(tiny_tokenizer_dir, tmp_path):
    """Smoothing moves scale from activations to weights; the float graph computes the same thing.
    (Norm gains are perturbed first: a fresh model's all-ones gains are deduplicated by the
    exporter into one shared initializer, which smoothing rightly leaves alone.)"""
    import onnxruntime as ort
    import torch
    from conftest import lively_model

    from calibration.smoothquant import smooth
    from export.onnx_export import export_onnx

    m = lively_model("replace", tiny_tokenizer_dir)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    m.save_pretrained(str(tmp_path / "ckpt"))
    export_onnx(str(tmp_path / "ckpt"), str(tmp_path / "bundle"))
    b = load_bundle(str(tmp_path / "bundle"))
    _, feeds = record_feeds(b, load_calibration("builtin", 3), decode_steps=2)
    model = onnx.load(b.graph_path("decoder"))
    before = {i.name: onnx.numpy_helper.to_array(i).copy() for i in model.graph.initializer}
    groups = smooth(model, feeds, alpha=0.5)
    assert len(groups) == 3 * 2  # per block: q/k/v (norm1 gain), gate/up (norm2 gain), down (up_proj columns)
    changed = [
        i.name
        for i in model.graph.initializer
        if not np.array_equal(before[i.name], onnx.numpy_helper.to_array(i))
    ]
    assert sum("norm" in c for c in changed) == 4 and len(changed) == 4 + 2 * 6
    # only groups whose every MatMul will have quantized activations (int8-static: gate/up, not q/k/v)
    model = onnx.load(b.graph_path("decoder"))
    gate_up = {n.name for n in model.graph.node if "gate_proj" in n.name or "up_proj" in n.name}
    assert len(smooth(model, feeds, alpha=0.5, only=gate_up | {"/decoder/blocks.0/attn/q_proj/MatMul"})) == 2
    a = ort.InferenceSession(b.graph_path("decoder"), providers=["CPUExecutionProvider"])
    c = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for feed in feeds:
        np.testing.assert_allclose(c.run(None, feed)[0], a.run(None, feed)[0], rtol=1e-4, atol=1e-4)


def _activation_scales(path: str) -> dict[str, float]:
    """{QuantizeLinear node: scale} over both graphs of a Q/DQ bundle."""
    out = {}
    for graph in ("vision_encoder", "decoder"):
        m = onnx.load(os.path.join(path, f"{graph}.onnx"))
        inits = {i.name: onnx.numpy_helper.to_array(i) for i in m.graph.initializer}
        out |= {n.name: float(inits[n.input[1]]) for n in m.graph.node if n.op_type == "QuantizeLinear"}
    return out


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_histogram_methods_take_feeds_of_different_shapes(lively, quantized, method, tmp_path):
    """Prefill and decode feeds differ in shape; histogram calibration must still work, and its
    ranges stay within minmax's (entropy clips the tails)."""
    _, bundle, _ = lively
    m = quantize_bundle(bundle, str(tmp_path / method), "int8-static", samples=8, method=method)
    assert m.quantization["method"] == method and m.quantization["calibration"]["decoder_feeds"] == 40
    scales = _activation_scales(str(tmp_path / method))
    minmax = _activation_scales(quantized["int8-static"][1])
    assert set(scales) == set(minmax) and len(scales) > 10 and all(v > 0 for v in scales.values())
    assert all(scales[k] <= minmax[k] * 1.002 for k in scales)  # within the largest |x| seen (fp16 scales)
    if method == "entropy":  # percentile 99.999 of this little data is the largest value itself
        assert any(scales[k] < minmax[k] * 0.99 for k in scales)


def test_static_bundle_is_qdq_int8_on_an_fp16_base(lively, quantized):
    """What TensorRT's strongly typed build reads: every weight MatMul of both graphs takes int8
    weights (per output channel, [-127, 127], fp16 scales) through DequantizeLinear and multiplies
    in fp16; activations are Q/DQ'd (fp16 scale, zero point 0) into the vision MatMuls and the
    decoder's out_proj/gate/up of the inner blocks, and nowhere else; no calibration cache."""
    from calibration.nbits import matches
    from calibration.qdq import weight_only_patterns

    model, bundle, _ = lively
    _, path = quantized["int8-static"]
    assert not os.path.exists(os.path.join(path, "calibration.cache"))
    fp32 = {
        g: {n.name for n in onnx.load(os.path.join(bundle, f"{g}.onnx")).graph.node if n.op_type == "MatMul"}
        for g in ("vision_encoder", "decoder")
    }
    for graph in ("vision_encoder", "decoder"):
        m = onnx.load(os.path.join(path, f"{graph}.onnx"))
        assert m.opset_import[0].version >= 19
        inits = {i.name: onnx.numpy_helper.to_array(i) for i in m.graph.initializer}
        producer = {o: n for n in m.graph.node for o in n.output}
        weight_matmuls = [
            n
            for n in m.graph.node
            if n.op_type == "MatMul"
            and n.input[1] in producer
            and producer[n.input[1]].op_type == "DequantizeLinear"
        ]
        assert weight_matmuls and {n.name for n in weight_matmuls} < fp32[graph]
        for n in weight_matmuls:
            dq = producer[n.input[1]]
            q, scale = inits[dq.input[0]], inits[dq.input[1]]
            assert (
                q.dtype == np.int8
                and q.min() >= -127
                and scale.dtype == np.float16
                and scale.shape == (q.shape[1],)
            )
            x = producer[n.input[0]]
            expect_qdq = graph == "vision_encoder" or not matches(n.name, weight_only_patterns(4))
            assert (x.op_type == "DequantizeLinear") == expect_qdq, n.name
            if expect_qdq:
                assert (
                    producer[x.input[0]].op_type == "QuantizeLinear" and inits[x.input[1]].dtype == np.float16
                )
        quantized_inputs = sum(producer[n.input[0]].op_type == "DequantizeLinear" for n in weight_matmuls)
        assert quantized_inputs == (len(weight_matmuls) if graph == "vision_encoder" else 2 * 3)


def test_static_bundle_runs_as_written_on_onnxruntime(quantized, tmp_path):
    """The runtime turns ONNX Runtime's Q/DQ fusions off for int8-static: otherwise the CPU
    provider rewrites weight-only DequantizeLinear -> MatMul into MatMulNBits, which quantizes the
    fp16 activations at run time (not what the graph, or TensorRT, computes)."""
    import onnxruntime as ort

    from runtime.onnx_backend import session_options

    _, path = quantized["int8-static"]
    ops = {}
    for literal in (False, True):
        out = str(tmp_path / f"opt-{literal}.onnx")
        ort.InferenceSession(
            os.path.join(path, "decoder.onnx"),
            session_options(1, out, literal_qdq=literal),
            providers=["CPUExecutionProvider"],
        )
        ops[literal] = {n.op_type for n in onnx.load(out).graph.node}
    assert "MatMulNBits" in ops[False] and "MatMulNBits" not in ops[True]
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops[True]


def test_every_mode_runs_through_the_runtime_close_to_fp32(lively, quantized):
    """Teacher-forced against PyTorch on the built-in test split, each mode under its recipe's KL
    gate (int8 <= 0.01, int4 <= 0.05, fp16 <= 0.001 nats/token); the vision encoder stays at
    cosine > 0.99."""
    _, _, ckpt = lively
    ref = parity.Reference(ckpt)
    cases = metrics.builtin_cases(8)
    for mode, (manifest, path) in quantized.items():
        assert manifest.precision == "fp32" and manifest.quantization["mode"] == mode
        pipe = VLMPipeline.from_bundle(path)
        assert pipe.bundle.mode == mode
        s = metrics.compare(pipe, ref, cases, max_new_tokens=6)
        assert s["kl_mean"] < RECIPES[mode].gates.kl_mean_max, (mode, s["kl_mean"])
        assert s["vision_cosine_min"] > 0.99, (mode, s["vision_cosine_min"])


def test_sizes_shrink_and_tied_matrix_is_stored_once(lively, quantized):
    _, bundle, _ = lively
    fp32 = load_bundle(bundle).manifest.files["decoder.onnx"]["bytes"]
    sizes = {m: man.files["decoder.onnx"]["bytes"] for m, (man, _) in quantized.items()}
    assert sizes["int4"] < sizes["int8-dynamic"] < sizes["fp16"] < fp32
    m = onnx.load(os.path.join(quantized["int8-dynamic"][1], "decoder.onnx"))
    ops = {n.op_type for n in m.graph.node}
    assert {"MatMulNBits", "GatherBlockQuantized"} <= ops and "Gemm" not in ops
    shared = [i.name for i in m.graph.initializer if i.name.startswith("decoder.token_embedding.weight")]
    assert "decoder.token_embedding.weight" not in shared  # the float matrix is gone
    users = [n.op_type for n in m.graph.node if "decoder.token_embedding.weight_Q8" in n.input]
    assert sorted(users) == ["GatherBlockQuantized", "MatMulNBits"]


def test_int4_bundle_holds_gptq_rounded_4bit_matmuls(quantized):
    """The int4 recipe on the 4-block model: the middle blocks' q/gate/up projections are 4-bit
    MatMulNBits, the kept layers and the edge blocks 8-bit, and GPTQ rounded the 4-bit ones."""
    manifest, path = quantized["int4"]
    m = onnx.load(os.path.join(path, "decoder.onnx"))
    bits = {
        n.name: onnx.helper.get_attribute_value(next(a for a in n.attribute if a.name == "bits"))
        for n in m.graph.node
        if n.op_type == "MatMulNBits"
    }
    four = sorted(n for n, b in bits.items() if b == 4)
    assert four and all(("blocks.1/" in n or "blocks.2/" in n) for n in four), four
    assert all(p in " ".join(four) for p in ("q_proj", "gate_proj", "up_proj"))
    assert all(bits[n] == 8 for n in bits if "down_proj" in n or "blocks.0/" in n or "blocks.3/" in n)
    assert manifest.quantization["notes"]["gptq"].startswith(f"{len(four)} 4-bit MatMuls rounded by GPTQ")


def test_nbits_bits_per_layer_pattern(lively):
    from calibration.nbits import quantize_nbits

    _, bundle, _ = lively
    m = quantize_nbits(
        onnx.load(os.path.join(bundle, "decoder.onnx")),
        4,
        keep_8bit=["*/mlp/down_proj/*"],
        exclude=["*/blocks.1/attn/q_proj/*"],
        head_bits=8,
    )
    bits = {
        n.name: onnx.helper.get_attribute_value(next(a for a in n.attribute if a.name == "bits"))
        for n in m.graph.node
        if n.op_type in ("MatMulNBits", "GatherBlockQuantized")
    }
    assert {b for n, b in bits.items() if "down_proj" in n} == {8}
    assert {b for n, b in bits.items() if "up_proj" in n or "blocks.0/attn/q_proj" in n} == {4}
    assert not any("blocks.1/attn/q_proj" in n for n in bits)  # excluded: still a float MatMul
    assert any(n.op_type == "MatMul" and "blocks.1/attn/q_proj" in n.name for n in m.graph.node)
    assert [b for n, b in bits.items() if "Gather" in n or "head" in n] == [8, 8]


def test_pair_limited_weights_stay_in_int16_and_close_to_the_weights():
    """Every neighbouring pair along K sums to at most 128 in magnitude (the AVX2 kernel adds each
    pair into int16: 255 x 128 fits), the largest weight of a column keeps at least 64 levels,
    and each weight is within one step of its value (half a step from rounding; a pair whose
    rounding overshot is trimmed on the weight rounded furthest, which ends under one step)."""
    from calibration.dynamic_int8 import PAIR_MAX, quantize_pairs

    rng = np.random.default_rng(0)
    spiky = rng.standard_normal((65, 24)).astype(np.float32)  # odd K; a pair of outliers per column
    spiky[10:12] *= 20
    for w in (
        rng.standard_normal((768, 48)).astype(np.float32),
        spiky,
        np.tile(np.float32([1.0, 1.0]), (32, 3)).reshape(64, 3),
    ):
        q, scale = quantize_pairs(w)
        assert q.dtype == np.int8 and scale.shape == (w.shape[1],)
        padded = np.vstack([q.astype(np.int32), np.zeros((w.shape[0] % 2, w.shape[1]), np.int32)])
        assert np.abs(padded).reshape(-1, 2, w.shape[1]).sum(1).max() <= PAIR_MAX
        assert np.abs(q).max(0).min() >= 64
        assert (np.abs(q * scale - w) <= scale * 1.0 + 1e-7).all()


def test_vision_encoder_goes_through_dynamic_int8_with_its_biases_folded(lively, quantized):
    """The CPU recipes' vision encoder: every weight MatMul is a DynamicQuantizeMatMul that adds
    its bias itself (the Add after it is gone); int4-fp16 keeps 8-bit MatMulNBits."""
    _, bundle, _ = lively
    fp32 = onnx.load(os.path.join(bundle, "vision_encoder.onnx"))
    n_weights = sum(
        n.op_type == "MatMul" and n.input[1] in {i.name for i in fp32.graph.initializer}
        for n in fp32.graph.node
    )
    for mode in ("int8-dynamic", "int4"):
        m = onnx.load(os.path.join(quantized[mode][1], "vision_encoder.onnx"))
        dq = [n for n in m.graph.node if n.op_type == "DynamicQuantizeMatMul"]
        assert len(dq) == n_weights > 0 and not any(n.op_type == "MatMulNBits" for n in m.graph.node)
        with_bias = [n for n in dq if len(n.input) == 5 and n.input[4]]
        adds = sum(n.op_type == "Add" for n in fp32.graph.node) - sum(
            n.op_type == "Add" for n in m.graph.node
        )
        assert len(with_bias) == adds > 0
        assert "DynamicQuantizeMatMul" in quantized[mode][0].quantization["notes"]["vision_encoder"]
    m = onnx.load(os.path.join(quantized["int4-fp16"][1], "vision_encoder.onnx"))
    assert {"MatMulNBits"} <= {n.op_type for n in m.graph.node} and not any(
        n.op_type == "DynamicQuantizeMatMul" for n in m.graph.node
    )


def test_a_vit_with_outlier_channels_falls_back_to_matmulnbits(tiny_tokenizer_dir, tmp_path):
    """Real ViTs have outlier channels after LayerNorm, which one activation scale per tensor
    (DynamicQuantizeMatMul) cannot hold. Made here by scaling one channel of every LayerNorm's
    gain and shift 100x (cosine 0.947 in DynamicQuantizeMatMul on the built-in images). The
    quantizer measures that loss and gives the encoder 8-bit MatMulNBits (activation scales per
    block of 32) instead, and the recipe's vision gate then holds (0.996 measured)."""
    import torch

    from export.onnx_export import export_onnx
    from runtime.pipeline import VLMPipeline
    from tests.conftest import lively_model

    model = lively_model("replace", tiny_tokenizer_dir, seed=1)
    with torch.no_grad():
        for block in model.vision_encoder.blocks:
            for ln in (block.ln1, block.ln2):
                ln.weight[5] *= 100.0
                ln.bias[5] *= 100.0
    model.save_pretrained(tmp_path / "ckpt")
    export_onnx(str(tmp_path / "ckpt"), str(tmp_path / "fp32"))
    manifest = quantize_bundle(str(tmp_path / "fp32"), str(tmp_path / "int8"), "int8-dynamic")
    check = manifest.quantization["vision_check"]
    assert check["kept"] == "MatMulNBits" and check["cosine_min"] < check["bar"], check
    ops = {n.op_type for n in onnx.load(str(tmp_path / "int8" / "vision_encoder.onnx")).graph.node}
    assert "MatMulNBits" in ops and "DynamicQuantizeMatMul" not in ops
    assert "MatMulNBits" in manifest.quantization["notes"]["vision_encoder"]
    size = model.cfg.vit_img_size
    pixels = np.random.default_rng(0).uniform(-1, 1, (2, 3, size, size)).astype(np.float32)
    a, b = (
        VLMPipeline.from_bundle(str(tmp_path / d)).backend.encode_images(pixels) for d in ("fp32", "int8")
    )
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    assert cos.min() >= RECIPES["int8-dynamic"].gates.vision_cosine_min, cos.min()


def test_quantize_refuses_bad_requests(lively, quantized, tmp_path):
    _, bundle, _ = lively
    with pytest.raises(ValueError, match="already quantized \\(mode int4\\)"):
        quantize_bundle(quantized["int4"][1], str(tmp_path / "again"), "int8-dynamic")
    with pytest.raises(ValueError, match="unknown mode 'int3'"):
        quantize_bundle(bundle, str(tmp_path / "x"), "int3")
    with pytest.raises(ValueError, match="at least 8 are needed|at least 8 samples"):
        quantize_bundle(bundle, str(tmp_path / "y"), "int8-static", samples=2)
    assert not (tmp_path / "y").exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]


# ----------------------------------------------------------------------------- validate
def test_validate_passes_good_bundles_and_fails_a_perturbed_weight(lively, tmp_path):
    _, bundle, ckpt = lively
    runner = CliRunner()
    report = tmp_path / "report.json"
    ok = runner.invoke(
        export_cli, ["validate", bundle, "--reference", ckpt, "--samples", "4", "--json", str(report)]
    )
    assert ok.exit_code == 0, ok.output
    assert "passed" in ok.output and json.loads(report.read_text())["failures"] == []

    # corrupt one decoder weight (and re-sign the manifest so the bundle still loads): validate must fail
    import shutil

    from core.bundle import Manifest

    bad = tmp_path / "bad"
    shutil.copytree(bundle, bad)
    m = onnx.load(str(bad / "decoder.onnx"))
    w = next(i for i in m.graph.initializer if "MatMul" in i.name or "proj" in i.name)
    arr = onnx.numpy_helper.to_array(w).copy()
    arr += np.random.default_rng(0).normal(0, 0.5, arr.shape).astype(arr.dtype)
    w.CopyFrom(onnx.numpy_helper.from_array(arr, w.name))
    onnx.save(m, str(bad / "decoder.onnx"))
    Manifest.from_dict(json.loads((bad / "manifest.json").read_text()), "bad").write(str(bad))
    res = runner.invoke(export_cli, ["validate", str(bad), "--reference", ckpt, "--samples", "4"])
    assert res.exit_code == 1 and "kl_mean" in res.output, res.output


def test_stored_reference_is_the_checkpoints_and_travels_with_quantized_bundles(lively, quantized):
    """The results stored at export give the same comparison as running the checkpoint now, and
    every quantized bundle carries them, so it validates on a device without torch."""
    _, bundle, ckpt = lively
    pipe = VLMPipeline.from_bundle(bundle)
    stored = metrics.StoredReference(pipe.bundle)
    assert len(stored.cases) == 4 and stored.max_new_tokens == 6
    a = metrics.compare(pipe, stored, stored.cases, 6)
    b = metrics.compare(pipe, parity.Reference(ckpt), stored.cases, 6)
    for key in ("kl_mean", "top1_agreement", "exact_match", "vision_cosine_min", "logits_max_abs"):
        assert a[key] == pytest.approx(b[key], abs=1e-12), key
    for mode, (_, path) in quantized.items():
        q = VLMPipeline.from_bundle(path)
        s = metrics.compare(q, metrics.StoredReference(q.bundle), stored.cases, 6)
        assert not metrics.gate(s, gates_for(mode)), (mode, s["kl_mean"])


def test_validate_threshold_overrides():
    assert gates_for("int4", {"kl_mean_max": 0.1})["kl_mean_max"] == 0.1
    assert gates_for("int4")["kl_mean_max"] == 0.05
    with pytest.raises(ValueError, match="unknown threshold 'kl'"):
        gates_for("int4", {"kl": 0.1})
    assert metrics.gate({"kl_mean": 0.2, "top1_decisive": 0.99}, {"kl_mean_max": 0.1, "top1_min": 0.9}) == [
        "kl_mean = 0.2 > 0.1"
    ]


def _decoder_row(ref_logits: np.ndarray, got_logits: np.ndarray) -> dict:
    """One case's decoder metrics as compare() makes them, the greedy answers taken from these logits."""
    return metrics.decoder_row(
        ref_logits, got_logits, ref_logits.argmax(-1).tolist(), got_logits.argmax(-1).tolist()
    )


def test_near_tied_steps_are_gated_on_kl_and_said_so():
    """A random-weight model's reference often ties its top two tokens: a quantized bundle whose KL is
    tiny flips such a tie, and its answer parts there. That is within the KL gate, so top-1 and exact
    match are gated elsewhere, and the report says how many steps and answers were left to KL. A flip
    where the reference was decisive still fails."""
    rng = np.random.default_rng(0)
    gates = gates_for("int4")
    near = metrics.tie_margin(gates["kl_mean_max"])  # 4*sqrt(0.05) = 0.89 nats
    assert near == pytest.approx(0.894, abs=1e-3)
    rows = []
    for _ in range(6):
        ref = rng.normal(0, 1, (8, 50))
        ref[np.arange(8), rng.integers(0, 50, 8)] += 10.0  # a clear choice at every step...
        top = ref.argmax(-1)
        second = (top + 1) % 50
        got = ref + rng.normal(0, 0.01, ref.shape)
        for step in (2, 5):  # ...but at steps 2 and 5 the top two are 0.05 apart
            ref[step, second[step]] = ref[step, top[step]] - 0.05
            got[step, second[step]] = got[step, top[step]] + 0.05  # and the bundle breaks the tie
        rows.append(_decoder_row(ref, got))
    before = metrics.summarize([dict(r) for r in rows])  # no near ties: today's gates
    assert before["top1_agreement"] == 6 / 8 and before["exact_match"] == 0.0
    assert {f.split(" =")[0] for f in metrics.gate(before, gates)} == {
        "top1_decisive",
        "exact_match_decisive",
    }
    after = metrics.summarize([dict(r) for r in rows], near)
    assert after["kl_mean"] < 0.01 and metrics.gate(after, gates) == []
    assert (
        after["top1_decisive"] == 1.0 and after["near_tied_steps"] == 12 and after["parted_at_near_tie"] == 6
    )
    assert "exact_match_decisive" not in after  # every answer parted at a tie: nothing left to gate on
    note = metrics.ties_note(after)
    assert note.startswith("near ties: 12 of 48 steps") and "6 of 6 answers" in note and "0.894 nats" in note

    decisive_flip = rows[0] | {"top1": [True] * 7 + [False], "common_prefix": 7}  # parts at step 7
    worse = metrics.summarize([dict(r) for r in rows[1:]] + [decisive_flip], near)
    assert worse["top1_decisive"] < 1.0 and worse["exact_match_decisive"] == 0.0
    assert any(f.startswith("exact_match_decisive = 0 <") for f in metrics.gate(worse, gates))


# ----------------------------------------------------------------------------- bench
def test_bench_measures_pytorch_and_bundles_and_plots(lively, quantized, tmp_path):
    _, bundle, ckpt = lively
    runner = CliRunner()
    png, out = tmp_path / "bench.png", tmp_path / "bench.json"
    res = runner.invoke(
        export_cli,
        [
            "bench",
            bundle,
            "--reference",
            ckpt,
            "--variants",
            quantized["int8-dynamic"][1],
            "--max-new-tokens",
            "6",
            "--repeats",
            "1",
            "--growth",
            "4",
            "--plot",
            str(png),
            "--json",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    result = json.loads(out.read_text())
    names = [r["name"] for r in result["rows"]]
    assert names == ["pytorch", "bundle", "int8-dynamic"]
    for r in result["rows"]:
        assert r["decode_tokens_per_s"]["median"] > 0 and r["peak_rss_mb"] > 10 and r["bytes"] > 0
        assert r["prompt_positions"] == result["rows"][0]["prompt_positions"]
    assert result["rows"][1]["same_tokens_as_first"]  # the fp32 bundle says what PyTorch says
    g = result["growth"][0]
    assert g["max_new_tokens"] == 4 and g["pytorch_no_cache_s_per_token"] > 0 and g["runtime_s_per_token"] > 0
    assert png.stat().st_size > 10_000 and "| pytorch | fp32 |" in res.output
    # power, tokens/J and RAM in use: measured on a Jetson, and said to be absent elsewhere
    from evaluation.power import NOT_A_JETSON, PowerMonitor

    if PowerMonitor.detect().source is None:
        assert all(
            r["power"] == {"source": None, "available": False, "reason": NOT_A_JETSON}
            for r in result["rows"][1:]
        )
        assert (
            f"power, tokens/J, RAM in use: {NOT_A_JETSON}" in res.output
            and "| n/a | n/a | n/a |" in res.output
        )
    else:
        assert all(r["power"]["available"] and r["power"]["tokens_per_joule"] > 0 for r in result["rows"][1:])


# ----------------------------------------------------------------------------- trained model (slow)
@pytest.mark.slow
def test_quantized_trained_model_meets_the_accuracy_bars(trained_tiny, tmp_path):
    """Each recipe's KL gate on a (briefly) trained default model, 300 built-in test questions
    against fp32 PyTorch, and task accuracy within 1 point (int8, fp16) or 2 points (int4) of the
    fp32 model's."""
    from export.onnx_export import export_onnx

    fp32 = str(tmp_path / "fp32")
    export_onnx(trained_tiny, fp32)
    ref, cases = parity.Reference(trained_tiny), metrics.builtin_cases(300)
    accuracy_bar = {
        "fp16": 0.01,
        "int8-dynamic": 0.01,
        "int8-w8a8": 0.01,
        "int8-w8a8-rotated": 0.01,
        "int8-static": 0.01,
        "int4": 0.02,
        "int4-fp16": 0.02,
    }
    assert set(accuracy_bar) == set(QUANTIZE_MODES)
    for mode, acc_bar in accuracy_bar.items():
        kl_bar = RECIPES[mode].gates.kl_mean_max
        path = str(tmp_path / mode)
        quantize_bundle(fp32, path, mode, samples=16)
        s = metrics.compare(VLMPipeline.from_bundle(path), ref, cases, max_new_tokens=4)
        assert s["kl_mean"] <= kl_bar, (mode, s["kl_mean"])
        # +1e-9: a 6-answer difference in 300 computes as 0.020000000000000018; the bar is inclusive
        assert abs(s["task_accuracy"] - s["reference_task_accuracy"]) <= acc_bar + 1e-9, (
            mode,
            s["task_accuracy"],
        )


@pytest.mark.slow
def test_demo_end_to_end_on_a_short_run(tmp_path):
    from cli.demo import run_demo

    r = run_demo(str(tmp_path / "demo"), test_samples=24, steps=60)
    assert set(r["bundles"]) == {"fp32", "int8", "int8 fused"}
    assert r["bundles"]["fp32"]["exact_match"] == 1.0 and not r["bundles"]["fp32"]["failures"]
    for int8 in ("int8", "int8 fused"):
        assert r["bundles"][int8]["bytes"] < 0.5 * r["bundles"]["fp32"]["bytes"]
    assert r["pytorch"]["decode_tokens_per_s"]["median"] > 0
    assert os.path.exists(tmp_path / "demo" / "demo.json")


def test_quantize_runs_without_torch(lively, tmp_path):
    """Quantizing (like building engines) happens where torch may be absent: nothing imports it."""
    import subprocess
    import sys

    _, bundle, _ = lively
    code = (
        "import sys\n"
        "from calibration.quantize import quantize_bundle\n"
        f"quantize_bundle({bundle!r}, {str(tmp_path / 'q')!r}, 'int4', samples=8)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run(
        [sys.executable, "-c", code],
        cwd=repo,
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=repo, TQDM_DISABLE="1"),
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "q" / "manifest.json").exists()


def test_fused_bundles_quantize_to_the_cpu_modes_only(tiny_tokenizer_dir, tmp_path):
    """A fused bundle (decoder and vision encoder) takes int8-dynamic and int4 (same KL bars as the standard graph)
    and refuses the GPU/TensorRT modes; TensorRT refuses the fused graph itself."""
    from trt.build import check_buildable

    _, bundle = export_lively("replace", tiny_tokenizer_dir, tmp_path, decoder="fused")
    ref, cases = parity.Reference(str(tmp_path / "ckpt")), metrics.builtin_cases(8)
    for mode, kl_bar in (("int8-dynamic", 0.01), ("int8-w8a8", 0.01), ("int4", 0.05)):
        manifest = quantize_bundle(bundle, str(tmp_path / mode), mode, samples=8)
        if mode == "int8-w8a8":  # SmoothQuant folds into the fused graph's norms and gate/up too
            note = manifest.quantization["notes"]["per_token_int8"]
            blocks = load_bundle(bundle).config.lm_n_blocks
            assert (
                f"{5 * blocks} decoder MatMuls" in note and f"{2 * blocks} input groups smoothed" in note
            ), note
        assert manifest.decoder_graph == manifest.vision_graph == "fused"
        ops = {n.op_type for n in onnx.load(str(tmp_path / mode / "decoder.onnx")).graph.node}
        assert {"GroupQueryAttention", "MatMulNBits", "GatherBlockQuantized"} <= ops and "MatMul" not in ops
        s = metrics.compare(VLMPipeline.from_bundle(str(tmp_path / mode)), ref, cases, max_new_tokens=6)
        assert s["kl_mean"] < kl_bar, (mode, s["kl_mean"])
    for mode in ("int8-static", "int4-fp16", "fp16"):
        with pytest.raises(ValueError, match=f"fused vision_encoder and decoder .*mode {mode} targets GPUs"):
            quantize_bundle(bundle, str(tmp_path / "x"), mode, samples=8)
    with pytest.raises(ValueError, match="vision_encoder uses .*MultiHeadAttention"):
        check_buildable(bundle)


def _matmuls_graph(w: np.ndarray, bias: np.ndarray) -> onnx.ModelProto:
    """Two weight MatMuls reading one input x [B, S, K], the first with a bias Add."""
    from onnx import TensorProto, helper, numpy_helper

    k, n = w.shape
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["xw"], name="first/MatMul"),
        helper.make_node("Add", ["xw", "b"], ["y"], name="first/Add"),
        helper.make_node("MatMul", ["x", "w2"], ["z"], name="second/MatMul"),
    ]
    inits = [
        numpy_helper.from_array(a, name) for a, name in ((w, "w"), (bias, "b"), (w[:, ::-1].copy(), "w2"))
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", k])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, ["B", "S", n]) for o in ("y", "z")],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_per_token_int8_gives_every_row_its_own_scale():
    """Per-token W8A8 (calibration/per_token_int8.py) on activations with an attention-sink row 100x
    the others: every other row keeps ~1% error where one scale per tensor (DynamicQuantizeMatMul)
    loses most of its precision; a row's output never depends on its neighbours (bit-identical when
    another row changes); MatMuls reading one input share one quantization; a bias Add stays (ONNX
    Runtime would scale a folded bias by the row's scale too)."""
    import onnxruntime as ort

    from calibration.dynamic_int8 import quantize_dynamic_int8
    from calibration.per_token_int8 import quantize_per_token

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((576, 256)) * 0.05).astype(np.float32)
    bias = rng.standard_normal(256).astype(np.float32)
    x = rng.standard_normal((2, 9, 576)).astype(np.float32)
    x[0, 0] *= 100  # the sink
    exact = x @ w + bias

    def run(model, feed):
        s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return s.run(["y"], {"x": feed})[0]

    per_token = quantize_per_token(_matmuls_graph(w, bias))
    ops = [n.op_type for n in per_token.graph.node]
    assert ops.count("QuantizeLinear") == 1 and ops.count("MatMulIntegerToFloat") == 2 and "Add" in ops
    dynamic = quantize_dynamic_int8(_matmuls_graph(w, bias))

    def row_error(y):  # relative error of each row but the sink's
        err = np.linalg.norm(y - exact, axis=-1) / np.linalg.norm(exact - bias, axis=-1)
        return np.delete(err.reshape(-1), 0)

    ours, theirs = row_error(run(per_token, x)), row_error(run(dynamic, x))
    assert ours.max() < 0.02 and np.median(theirs) > 10 * ours.max(), (ours.max(), np.median(theirs))

    changed = x.copy()
    changed[1, 4] = rng.standard_normal(576) * 30  # another row, much larger
    a, b = run(per_token, x), run(per_token, changed)
    keep = np.ones((2, 9), bool)
    keep[1, 4] = False
    assert np.array_equal(a[keep], b[keep])


def test_per_token_int8_outlier_channels_in_float_or_rotated():
    """The two remedies of per_token_int8 for an input whose 4 channels run 50x the rest in every row
    (per-token int8 sizes each row's range for them: ~4% error here). Keeping the 4 in a float
    MatMul (chosen by outlier_channels from their calibrated maxima), or rotating the input by
    Hadamard blocks of 64 (the inverse folded into the weights: X W = (X H)(H^T W)), each takes the
    error down more than 3x, for both MatMuls reading x."""
    import onnxruntime as ort

    from calibration.per_token_int8 import hadamard, outlier_channels, quantize_per_token

    h = hadamard(64)
    assert np.allclose(h @ h, np.eye(64), atol=1e-6)  # orthonormal and symmetric: its own inverse
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((576, 256)) * 0.05).astype(np.float32)
    bias = np.zeros(256, np.float32)
    x = rng.standard_normal((2, 9, 576)).astype(np.float32)
    hot = np.array([7, 100, 301, 575])
    x[..., hot] *= 50
    kept = outlier_channels(np.abs(x).reshape(-1, 576).max(0), 4)
    assert kept.tolist() == hot.tolist()

    def error(model):
        s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        y, z = s.run(["y", "z"], {"x": x})
        exact_y, exact_z = x @ w, x @ w[:, ::-1]
        return max(np.linalg.norm(a - e) / np.linalg.norm(e) for a, e in ((y, exact_y), (z, exact_z)))

    plain = error(quantize_per_token(_matmuls_graph(w, bias)))
    split = quantize_per_token(_matmuls_graph(w, bias), outliers={"x": kept})
    ops = [n.op_type for n in split.graph.node]
    assert ops.count("Gather") == 1 and ops.count("MatMul") == 2 and ops.count("QuantizeLinear") == 1
    rotated = quantize_per_token(_matmuls_graph(w, bias), rotations={"x": 64})
    ops = [n.op_type for n in rotated.graph.node]
    assert ops.count("MatMul") == 1 and ops.count("QuantizeLinear") == 1  # one rotation, shared
    errors = error(split), error(rotated)
    assert plain > 0.02, plain
    assert max(errors) < plain / 3, (plain, errors)


def test_int8_w8a8_rows_prefilled_together_answer_as_alone(quantized):
    """The per-token decoder in a batch: four prompts prefilled as one left-padded batch and decoded
    together answer exactly as each does alone (padding and neighbours never touch a row's scales)."""
    from runtime.engine_api import EngineConfig
    from tests.engine_helpers import burst

    p = VLMPipeline.from_bundle(quantized["int8-w8a8"][1])
    assert {"MatMulIntegerToFloat", "MatMulNBits"} <= {
        n.op_type for n in onnx.load(p.bundle.graph_path("decoder")).graph.node
    }
    image = Image.new("RGB", (30, 20), (200, 40, 40))
    questions = ["What is it?", "Cat?", "How many red circles are there?", "What colour is the square?"]
    alone = [p.generate([image], q, max_new_tokens=6) for q in questions]
    got, prefills = burst(p, image, questions, 6, EngineConfig(max_batch=4, prefix_cache_mb=0))
    assert prefills == 1 and got == alone


def test_int8_static_keeps_activations_float_when_the_recipe_excludes_every_matmul(
    tiny_tokenizer_dir, tmp_path
):
    """On a 2-block decoder the int8-static recipe keeps both edge blocks weight-only: no decoder
    activation is quantized (an empty list must not mean "every node", as it did in onnxruntime's
    quantize_static), while the vision encoder's are."""
    _, bundle = export_lively("replace", tiny_tokenizer_dir, tmp_path, blocks=2)
    quantize_bundle(bundle, str(tmp_path / "q"), "int8-static", samples=8)
    count = {
        g: sum(n.op_type == "QuantizeLinear" for n in onnx.load(str(tmp_path / "q" / f"{g}.onnx")).graph.node)
        for g in ("vision_encoder", "decoder")
    }
    assert count["decoder"] == 0 and count["vision_encoder"] > 0, count
