"""TensorRT: the planning that needs no GPU (tested here), and GPU tests that build real engines.

The GPU tests need the `tensorrt` and `cuda-python` packages and a CUDA device; they skip with
the reason otherwise (always, on the CPU machines this project is developed on).
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from cli.main import export_main as export_cli
from core.bundle import load_bundle
from trt.build import check_buildable
from trt.plan import (
    ProfileLimits,
    check_engine_compatible,
    check_io_dtypes,
    io_dtypes,
    kv_buffer_bytes,
    pick_profile,
    polygraphy_command,
    profiles,
    trtexec_commands,
)


@pytest.fixture(scope="module")
def lively_bundle(tiny_tokenizer_dir, tmp_path_factory):
    from conftest import export_lively

    d = tmp_path_factory.mktemp("trt")
    _, bundle = export_lively("replace", tiny_tokenizer_dir, d)
    return bundle


def test_profiles_from_the_manifest(lively_bundle):
    m = load_bundle(lively_bundle)
    limits = ProfileLimits(max_batch=2, max_seq=64, max_context=128, max_images=3)
    p = profiles(m, limits)
    decode, prefill = p["decoder"]
    assert decode["name"] == "decode" and prefill["name"] == "prefill"
    heads, dim = m.kv.heads, m.kv.head_dim
    assert decode["max"]["input_ids"] == (2, 1) and decode["max"]["past_key_values.0.key"] == (
        2,
        heads,
        127,
        dim,
    )
    assert decode["max"]["attention_mask"] == (2, 128) and decode["min"]["past_key_values.1.value"] == (
        1,
        heads,
        0,
        dim,
    )
    assert prefill["max"]["input_ids"] == (2, 64) and prefill["max"]["attention_mask"] == (2, 128)
    # two prompts, each with one image at its largest split (2x2 tiles + a global view = 5 > 3)
    assert prefill["max"]["image_embeds"] == (
        2 * 5 * m.config.image_token_count,
        m.graph_input("decoder", "image_embeds")["shape"][1],
    )
    assert len([k for k in decode["min"] if k.startswith("past_key_values")]) == 2 * m.kv.layers
    assert p["vision_encoder"][0]["max"]["pixel_values"] == (3, 3, 32, 32)
    for prof in (decode, prefill):  # every profile is min <= opt <= max, input by input
        for name in prof["min"]:
            assert all(
                a <= b <= c
                for a, b, c in zip(prof["min"][name], prof["opt"][name], prof["max"][name], strict=True)
            )


def test_pick_profile_and_limits(lively_bundle):
    m = load_bundle(lively_bundle)
    limits = ProfileLimits(max_batch=1, max_seq=32, max_context=64, max_images=2)
    dec = profiles(m, limits)["decoder"]

    def shapes(seq, past, rows=0):
        s = {
            "input_ids": (1, seq),
            "attention_mask": (1, past + seq),
            "position_ids": (1, seq),
            "image_embeds": (rows, 64),
        }
        for i in range(m.kv.layers):
            for part in ("key", "value"):
                s[f"past_key_values.{i}.{part}"] = (1, m.kv.heads, past, m.kv.head_dim)
        return s

    assert pick_profile(dec, shapes(1, 40)) == 0  # a decode step
    assert pick_profile(dec, shapes(20, 0, rows=8)) == 1  # a prefill with image rows
    with pytest.raises(ValueError, match="rebuild the engines with larger"):
        pick_profile(dec, shapes(40, 0))
    with pytest.raises(ValueError, match="max_seq=80 exceeds max_context=64"):
        profiles(m, ProfileLimits(max_seq=80, max_context=64))
    with pytest.raises(ValueError, match="exceeds the model's context of 512"):
        profiles(m, ProfileLimits(max_seq=8, max_context=4096))
    # two ping-pong sets x layers x (key, value) x batch x heads x context x dim x 4 bytes
    assert kv_buffer_bytes(m, limits) == 2 * 2 * m.kv.layers * 1 * m.kv.heads * 64 * m.kv.head_dim * 4


def test_a_2x2_tiled_image_picks_the_prefill_profile(lively_bundle):
    """One image split 2x2 (a global view + 4 tiles: 5 vision inputs) under the default
    --max-images 4: its prefill must fit a profile, as the runtime builds it."""
    from PIL import Image

    from core.processors import ImageProcessor, Tokenizer, prepare_batch

    m = load_bundle(lively_bundle)
    cfg = m.config
    batch = prepare_batch(
        cfg,
        Tokenizer.from_dir(lively_bundle, cfg),
        ImageProcessor.from_config(cfg),
        [[Image.new("RGB", (64, 64), (9, 99, 199))]],
        ["What is it?"],
    )
    assert batch.pixel_values.shape[0] == 5
    rows, S = 5 * cfg.image_token_count, batch.input_ids.shape[1]
    shapes = {
        "input_ids": (1, S),
        "attention_mask": (1, S),
        "position_ids": (1, S),
        "image_embeds": (rows, cfg.lm_hidden_dim),
    }
    for i in range(m.kv.layers):
        for part in ("key", "value"):
            shapes[f"past_key_values.{i}.{part}"] = (1, m.kv.heads, 0, m.kv.head_dim)
    assert pick_profile(profiles(m, ProfileLimits(max_seq=128, max_context=256))["decoder"], shapes) == 1


def test_trtexec_and_polygraphy_text(lively_bundle):
    m = load_bundle(lively_bundle)
    cmds = trtexec_commands(
        m, ProfileLimits(max_seq=16, max_context=32), workspace_mb=512, timing_cache="t.cache"
    )
    dec = cmds["decoder"]
    assert dec.startswith("trtexec --onnx=decoder.onnx --saveEngine=decoder.engine --stronglyTyped")
    assert "--memPoolSize=workspace:512M" in dec and "--timingCacheFile=t.cache" in dec
    assert dec.count("--minShapes=") == 2 and dec.count("--maxShapes=") == 2  # decode + prefill profiles
    assert "input_ids:1x16" in dec and "past_key_values.1.value:1x2x31x16" in dec
    assert "--noTF32" in dec  # fp32 stays fp32 unless asked
    assert (
        "--noTF32" not in trtexec_commands(m, ProfileLimits(max_seq=16, max_context=32), tf32=True)["decoder"]
    )
    assert cmds["vision_encoder"].count("--minShapes=pixel_values:1x3x32x32") == 1
    limits = ProfileLimits(max_seq=16, max_context=32)
    poly = polygraphy_command(m, limits)
    assert poly.startswith("polygraphy run decoder.onnx --onnxrt --trt")
    # parse each shape option back the way polygraphy reads it (name:[d0,d1,...], space-separated)
    # and require exactly the decode profile's shapes
    decode = profiles(m, limits)["decoder"][0]
    words = poly.split()
    for option, key in (
        ("--input-shapes", "opt"),
        ("--trt-min-shapes", "min"),
        ("--trt-opt-shapes", "opt"),
        ("--trt-max-shapes", "max"),
    ):
        start = words.index(option) + 1
        args = []
        for w in words[start:]:
            if w.startswith("--"):
                break
            args.append(w)
        parsed = {}
        for a in args:
            name, _, dims = a.rpartition(":")
            assert dims.startswith("[") and dims.endswith("]"), a
            parsed[name] = tuple(int(d) for d in dims[1:-1].split(",") if d)
        assert parsed == decode[key], option


def test_engine_io_must_match_the_graph(lively_bundle):
    """The backend binds the graph's dtypes; an engine whose IO differs is refused by name."""
    b = load_bundle(lively_bundle)
    dec = io_dtypes(b, "decoder")
    assert dec["input_ids"] == dec["attention_mask"] == dec["position_ids"] == "int64"
    assert dec["logits"] == dec["image_embeds"] == dec["present.1.value"] == "float32"
    assert io_dtypes(b, "vision_encoder") == {"pixel_values": "float32", "image_embeds": "float32"}
    check_io_dtypes("decoder", dict(dec), dec)
    with pytest.raises(RuntimeError, match="logits: engine float16, graph float32.*rebuild"):
        check_io_dtypes("decoder", dec | {"logits": "float16"}, dec)
    with pytest.raises(RuntimeError, match=r"missing \['present.1.value'\]"):
        check_io_dtypes("decoder", {k: v for k, v in dec.items() if k != "present.1.value"}, dec)
    with pytest.raises(RuntimeError, match=r"unexpected \['inputs_embeds'\]"):
        check_io_dtypes("decoder", dec | {"inputs_embeds": "float32"}, dec)


def test_engine_compatibility_errors():
    meta = {
        "file": "decoder.engine",
        "tensorrt_version": "10.3.0",
        "compute_capability": [8, 7],
        "device_name": "Orin",
    }
    check_engine_compatible(meta, "10.3.0", {"name": "Orin", "compute_capability": [8, 7]})
    with pytest.raises(RuntimeError, match="built with TensorRT 10.3.0; this is TensorRT 10.7.0.*rebuild"):
        check_engine_compatible(meta, "10.7.0", {"name": "Orin", "compute_capability": [8, 7]})
    with pytest.raises(RuntimeError, match=r"compute capability \(8, 7\).*this GPU is \(9, 0\).*Rebuild"):
        check_engine_compatible(meta, "10.3.0", {"name": "H100", "compute_capability": [9, 0]})


def test_builder_refuses_contrib_op_bundles_and_explains_missing_tensorrt(lively_bundle, tmp_path):
    from calibration.quantize import quantize_bundle

    q = str(tmp_path / "int8")
    quantize_bundle(lively_bundle, q, "int8-dynamic")
    with pytest.raises(
        ValueError,
        match="vision_encoder uses ONNX Runtime contrib ops .*DynamicQuantizeMatMul.*TensorRT takes the fp32, fp16 "
        "or int8-static",
    ):
        check_buildable(q)
    res = CliRunner().invoke(export_cli, ["trt", lively_bundle, str(tmp_path / "engines")])
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        assert res.exit_code != 0 and "tensorrt Python package is not installed" in res.output
        assert not (tmp_path / "engines").exists()
    printed = CliRunner().invoke(export_cli, ["trt", lively_bundle, str(tmp_path / "x"), "--print-trtexec"])
    assert printed.exit_code == 0 and "trtexec --onnx=vision_encoder.onnx" in printed.output


# ----------------------------------------------------------------------------- GPU (TensorRT)
def _gpu_reason() -> str | None:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "tensorrt is not installed"
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        return "cuda-python is not installed"
    err, count = cudart.cudaGetDeviceCount()
    if int(err) != 0 or count < 1:
        return "no CUDA device"
    return None


gpu = pytest.mark.skipif(_gpu_reason() is not None, reason=f"TensorRT GPU test: {_gpu_reason()}")


@gpu
def test_trt_engines_give_the_onnx_runtime_tokens(lively_bundle, tmp_path):
    """Build the tiny model's engines (fp32), then greedy tokens on TensorRT == on ONNX Runtime."""
    from evaluation.metrics import builtin_cases
    from runtime.pipeline import GenerationRequest, VLMPipeline
    from trt.build import build_engines

    out = str(tmp_path / "engines")
    manifest = build_engines(
        lively_bundle, out, ProfileLimits(max_batch=1, max_seq=128, max_context=256, max_images=8)
    )
    assert set(manifest.tensorrt["engines"]) == {"decoder", "vision_encoder"}
    assert os.path.exists(os.path.join(out, "trtexec.txt"))
    trt_pipe = VLMPipeline.from_bundle(out, backend="trt")
    ort_pipe = VLMPipeline.from_bundle(lively_bundle)
    request = GenerationRequest(max_new_tokens=8)
    for case in builtin_cases(6):
        batch = ort_pipe.prepare([case.images], [case.prompt])
        want = [int(t[0]) for t in ort_pipe.generate_ids(batch, request)]
        got = [int(t[0]) for t in trt_pipe.generate_ids(batch, request)]
        assert got == want, case.prompt
    # vision embeddings agree closely too
    pixels = batch.pixel_values
    np.testing.assert_allclose(
        trt_pipe.backend.encode_images(pixels), ort_pipe.backend.encode_images(pixels), atol=1e-3, rtol=1e-3
    )


@gpu
def test_validate_on_tensorrt_and_stale_engine_refused(lively_bundle, tmp_path):
    import json

    from trt.build import build_engines

    out = str(tmp_path / "engines")
    build_engines(lively_bundle, out, ProfileLimits(max_batch=1, max_seq=128, max_context=256, max_images=8))
    ckpt = os.path.join(os.path.dirname(lively_bundle), "ckpt")
    res = CliRunner().invoke(
        export_cli, ["validate", out, "--reference", ckpt, "--backend", "trt", "--samples", "4"]
    )
    assert res.exit_code == 0, res.output
    stale = str(tmp_path / "stale")
    shutil.copytree(out, stale)
    mpath = os.path.join(stale, "manifest.json")
    m = json.load(open(mpath))
    m["tensorrt"]["engines"]["decoder"]["tensorrt_version"] = "0.0.0"
    json.dump(m, open(mpath, "w"))
    from runtime.pipeline import VLMPipeline

    with pytest.raises(RuntimeError, match="rebuild"):
        VLMPipeline.from_bundle(stale, backend="trt", verify=False)


def test_trt_backend_errors_without_engines_or_tensorrt(lively_bundle, tmp_path):
    import json

    from core.bundle import BundleError
    from runtime.pipeline import VLMPipeline

    with pytest.raises(BundleError, match="no TensorRT engines; build them with `nanovlm-export trt`"):
        VLMPipeline.from_bundle(lively_bundle, backend="trt")
    if _gpu_reason() == "tensorrt is not installed":
        fake = tmp_path / "fake"
        shutil.copytree(lively_bundle, fake)
        m = json.loads((fake / "manifest.json").read_text())
        m["tensorrt"] = {"engines": {}, "limits": {}}
        (fake / "manifest.json").write_text(json.dumps(m))
        with pytest.raises(RuntimeError, match="needs the tensorrt and cuda-python packages"):
            VLMPipeline.from_bundle(str(fake), backend="trt", verify=False)
    with pytest.raises(ValueError, match="unknown backend 'tflite'"):
        VLMPipeline.from_bundle(lively_bundle, backend="tflite")


# ----------------------------------------------------------------------------- compatibility check
@pytest.fixture(scope="module")
def trt_bundles(tiny_tokenizer_dir, tmp_path_factory):
    """The bundles meant for TensorRT (fp32, fp16, int8-static) of both image placements, plus the
    ONNX Runtime-only ones (fused decoder, int8-dynamic)."""
    from conftest import export_lively

    from calibration.quantize import quantize_bundle
    from export.onnx_export import export_onnx

    d = tmp_path_factory.mktemp("trt_check")
    out = {}
    for placement in ("replace", "prefix"):
        _, fp32 = export_lively(placement, tiny_tokenizer_dir, d / placement)
        out[f"{placement} fp32"] = fp32
        export_onnx(str(d / placement / "ckpt"), str(d / placement / "fp16"), precision="fp16")
        out[f"{placement} fp16"] = str(d / placement / "fp16")
        quantize_bundle(fp32, str(d / placement / "int8"), "int8-static", samples=8)
        out[f"{placement} int8-static"] = str(d / placement / "int8")
    quantize_bundle(out["replace fp32"], str(d / "int8-dynamic"), "int8-dynamic")
    export_onnx(str(d / "replace" / "ckpt"), str(d / "fused"), decoder="fused")
    return out | {"int8-dynamic": str(d / "int8-dynamic"), "fused": str(d / "fused")}


@pytest.mark.parametrize("target", ["trt-10.3", "trt-10.13"])
def test_every_bundle_meant_for_tensorrt_passes_the_check(trt_bundles, target):
    from trt.check import check_bundle

    for name in (
        "replace fp32",
        "replace fp16",
        "replace int8-static",
        "prefix fp32",
        "prefix fp16",
        "prefix int8-static",
    ):
        assert check_bundle(trt_bundles[name], target) == {"vision_encoder": [], "decoder": []}, name


def test_the_check_names_what_tensorrt_would_not_parse(trt_bundles, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from trt.check import check_bundle, check_model, target

    problems = check_bundle(trt_bundles["int8-dynamic"], "trt-10.3")
    assert any("com.microsoft.MatMulNBits is not a standard ONNX operator" in p for p in problems["decoder"])
    fused = check_bundle(trt_bundles["fused"], "trt-10.3")["decoder"]
    assert any("GroupQueryAttention" in p for p in fused)

    # the pattern the decoder graph used to have: CumSum over int64, with its axis a graph input
    graph = helper.make_graph(
        [helper.make_node("CumSum", ["x", "axis"], ["y"], name="count")],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.INT64, [4]),
            helper.make_tensor_value_info("axis", TensorProto.INT64, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.INT64, [4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    found = check_model(model, target("trt-10.3"), "g")
    assert "g: opset 21; trt-10.3 parses opsets 9 to 20" in found
    assert "g: count: CumSum on INT64; trt-10.3 takes FP32, FP16, BF16" in found
    assert "g: count: input 1 of CumSum (axis) must be a build-time constant" in found
    # an operator added after 10.3, and a non-zero Q/DQ zero point
    rms = helper.make_graph(
        [
            helper.make_node("RMSNormalization", ["x", "s"], ["y"], name="norm"),
            helper.make_node("DequantizeLinear", ["q", "sc", "zp"], ["d"], name="dq"),
        ],
        "h",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4]),
            helper.make_tensor_value_info("q", TensorProto.INT8, [4]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4]),
            helper.make_tensor_value_info("d", TensorProto.FLOAT, [4]),
        ],
        initializer=[
            helper.make_tensor("s", TensorProto.FLOAT, [4], [1.0] * 4),
            helper.make_tensor("sc", TensorProto.FLOAT, [], [0.1]),
            helper.make_tensor("zp", TensorProto.INT8, [], [3]),
        ],
    )
    found = check_model(
        helper.make_model(rms, opset_imports=[helper.make_opsetid("", 23)]), target("trt-10.3"), "h"
    )
    assert "h: norm: RMSNormalization is not parsed by trt-10.3 (added in a later TensorRT)" in found
    assert any("dq: DequantizeLinear with a non-zero zero point" in p for p in found)
    onnx.checker.check_model(model)  # the test graphs themselves are valid ONNX


def test_check_command(trt_bundles):
    ok = CliRunner().invoke(export_cli, ["check", trt_bundles["prefix int8-static"]])
    assert ok.exit_code == 0 and "trt-10.3: ok" in ok.output and "trt-10.13: ok" in ok.output, ok.output
    bad = CliRunner().invoke(export_cli, ["check", trt_bundles["fused"], "--target", "trt-10.3"])
    assert bad.exit_code == 1 and "problems" in bad.output and "GroupQueryAttention" in bad.output


@gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8-static"])
def test_trt_engines_of_each_precision_pass_the_bundles_gates(trt_bundles, precision, tmp_path):
    """fp32, fp16 and int8 (Q/DQ) engines, validated on TensorRT against the PyTorch results the
    bundle stores, under the bundle's own recipe gates."""
    from trt.build import build_engines

    out = str(tmp_path / "engines")
    build_engines(
        trt_bundles[f"replace {precision}"], out, ProfileLimits(max_batch=2, max_seq=128, max_context=256)
    )
    res = CliRunner().invoke(export_cli, ["validate", out, "--backend", "trt"])
    assert res.exit_code == 0, res.output


@gpu
def test_trt_batch_of_two_with_a_2x2_tiled_image_gives_the_onnx_runtime_tokens(lively_bundle, tmp_path):
    """Two prompts in one batch, one of them about an image split 2x2 (5 vision inputs): the
    engines' greedy answers equal ONNX Runtime's on the same fp32 bundle."""
    from PIL import Image

    from core.shapes_dataset import ShapesDataset
    from runtime.pipeline import VLMPipeline
    from trt.build import build_engines

    out = str(tmp_path / "engines")
    build_engines(lively_bundle, out, ProfileLimits(max_batch=2, max_seq=128, max_context=256))
    s = ShapesDataset("test", seed=0)[0]
    items = [(Image.new("RGB", (64, 64), (200, 40, 40)), "What is it?"), (s.image, s.question)]
    trt_pipe, ort_pipe = VLMPipeline.from_bundle(out, backend="trt"), VLMPipeline.from_bundle(lively_bundle)
    assert ort_pipe.prepare([[items[0][0]]], ["x"]).pixel_values.shape[0] == 5
    assert trt_pipe.generate_batch(items, max_new_tokens=8) == ort_pipe.generate_batch(
        items, max_new_tokens=8
    )
