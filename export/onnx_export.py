"""`nanovlm-export onnx SRC OUT`: a checkpoint -> a self-contained ONNX bundle (see docs/bundle.md).

The export writes into a temp directory next to OUT and renames it into place only after the
manifest (written last, with a SHA-256 per file) is complete: a failed export leaves nothing that
looks like a bundle.
"""

from __future__ import annotations

import logging
import os
import time
import warnings

import numpy as np
import onnx
import torch

from core.bundle import REFERENCE, Manifest, is_bundle
from core.config import VLMConfig, read_config_json
from core.files import check_target, staged_dir
from core.graph_io import graph_io
from core.processors import check_image_tiles
from nanovlm.checkpoint import resolve_checkpoint
from nanovlm.idefics3 import is_idefics3
from nanovlm.vision_language_model import VisionLanguageModel
from runtime.onnx_backend import FUSED_MIN_ORT
from trt.support import STANDARD_DOMAINS

from .graphs import DecoderGraph, VisionEncoderGraph, decoder_io_names

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
TWO_GB = 2**31
# stored PyTorch reference: cases x new tokens of logits (4 x 6 x 49,218 fp32 = 4.7 MB for SmolLM2)
REFERENCE_CASES, REFERENCE_TOKENS = 4, 6


def check_exportable(cfg: VLMConfig, src: str) -> None:
    """Refuse configurations the graphs do not cover, before any long work (weights not yet read)."""
    if cfg.vit_cls_flag:
        raise ValueError(
            f"{src}: vit_cls_flag=True (a CLS-pooled ViT) cannot feed the pixel-shuffle projector"
        )
    if cfg.lm_use_tokens:
        raise ValueError(f"{src}: lm_use_tokens=True is a text-only LM configuration, not a VLM")


DECODER_GRAPHS = ("standard", "fused")


def export_onnx(
    src: str,
    out: str,
    precision: str = "fp32",
    opset: int = DEFAULT_OPSET,
    decoder: str = "standard",
    overwrite: bool = False,
    vision: str | None = None,
    image_tiles: int | None = None,
) -> Manifest:
    """Export checkpoint `src` (directory or Hub id) to the bundle directory `out`; returns the manifest.

    decoder="standard": standard ONNX ops only (ONNX Runtime on any EP, TensorRT).
    decoder="fused": the same decoder step in ONNX Runtime's fused contrib ops (export/fused_decoder.py),
    several times fewer nodes and faster on a CPU; ONNX Runtime only, fp32 only.
    vision: the same choice for the vision encoder (export/fused_vision.py); None follows `decoder`.
    image_tiles: the resolution budget runtimes use by default (core/processors.py; None: the
    checkpoint's own processor settings).
    """
    if precision not in ("fp32", "fp16"):
        raise ValueError(f"precision={precision!r}: expected fp32 or fp16")
    if decoder not in DECODER_GRAPHS:
        raise ValueError(f"decoder={decoder!r}: expected one of {', '.join(DECODER_GRAPHS)}")
    if vision is not None and vision not in DECODER_GRAPHS:
        raise ValueError(f"vision={vision!r}: expected one of {', '.join(DECODER_GRAPHS)}")
    if "fused" in (decoder, vision) and precision != "fp32":
        raise ValueError(
            "decoder/vision='fused' is an fp32 ONNX Runtime CPU graph (its GroupQueryAttention has no fp32 "
            "CUDA kernel and no fp16 CPU speed-up); export fp16 with the standard graphs"
        )
    if not 17 <= opset <= 21:
        raise ValueError(f"opset {opset}: supported range is 17..21 (TensorRT 10.3 parses up to opset 20)")
    vision = vision or decoder
    check_target(out, is_bundle, "bundle", overwrite)
    t0 = time.time()
    directory = resolve_checkpoint(src)
    raw = read_config_json(os.path.join(directory, "config.json"))
    if not is_idefics3(raw):  # (an Idefics3 config is mapped, and checked, when the model loads)
        check_exportable(VLMConfig.from_dict(raw, os.path.join(directory, "config.json")), src)
    model = VisionLanguageModel.from_pretrained(directory).eval()
    if image_tiles is not None:
        check_image_tiles(model.cfg, image_tiles)
    if model.tokenizer is None:
        raise ValueError(
            f"{src}: no tokenizer files in the checkpoint and cfg.lm_tokenizer could not be loaded"
        )
    reference = reference_results(model, REFERENCE_CASES, REFERENCE_TOKENS)  # fp32, before any conversion
    if precision == "fp16":
        from .fp16 import prepare_fp16

        prepare_fp16(model)
    with staged_dir(out, prefix=".tmp-bundle-") as tmp:
        graphs = {}
        log.info("[1/4] exporting vision_encoder.onnx (%s)", vision)
        if vision == "fused":
            graphs["vision_encoder"] = _export_fused(model, tmp, "vision_encoder")
        else:
            graphs["vision_encoder"] = _export_vision(model, tmp, opset)
        log.info("[2/4] exporting decoder.onnx (%s)", decoder)
        if decoder == "fused":
            graphs["decoder"] = _export_fused(model, tmp, "decoder")
        else:
            graphs["decoder"] = _export_decoder(model, tmp, opset)
        log.info("[3/4] checking graphs (onnx.checker, shape inference, standard ops only)")
        for name, spec in graphs.items():
            path = os.path.join(tmp, spec["file"])
            if (decoder if name == "decoder" else vision) == "fused":
                check_fused_graph(path)
            else:
                check_graph(path, opset)
                warn_tensorrt(path)
            spec.update(graph_io(path))
        log.info("[4/4] writing tokenizer, config and manifest")
        model.tokenizer.save(tmp)
        model.cfg.save(os.path.join(tmp, "config.json"))
        with open(os.path.join(tmp, REFERENCE), "wb") as f:
            np.savez(f, **reference)
        stored = {
            "file": REFERENCE,
            "split": "test",
            "seed": 0,
            "cases": REFERENCE_CASES,
            "max_new_tokens": REFERENCE_TOKENS,
        }
        manifest = Manifest(
            precision,
            opset,
            graphs,
            decoder_graph=decoder,
            vision_graph=vision,
            image_tiles=image_tiles,
            reference=stored,
        ).write(tmp)
    log.info("bundle written to %s in %.1f s", out, time.time() - t0)
    return manifest


def reference_results(model: VisionLanguageModel, n_cases: int, max_new_tokens: int) -> dict[str, np.ndarray]:
    """PyTorch's greedy results on the first built-in test cases, as reference.npz arrays
    (vision_i, logits_i, tokens_i): what `validate` without --reference compares a bundle with."""
    from core.processors import ImageProcessor, prepare_batch
    from core.shapes_dataset import ShapesDataset
    from nanovlm.reference import greedy_reference

    ds, proc = ShapesDataset("test", seed=0), ImageProcessor.from_config(model.cfg)
    out = {}
    for i in range(n_cases):
        s = ds[i]
        batch = prepare_batch(model.cfg, model.tokenizer, proc, [[s.image]], [s.question])
        r = greedy_reference(model, batch, model.tokenizer.eos_token_id, max_new_tokens)
        out |= {
            f"vision_{i}": r["vision"],
            f"logits_{i}": r["logits"],
            f"tokens_{i}": np.asarray(r["tokens"], np.int64),
        }
    return out


def _onnx_export(module: torch.nn.Module, args: tuple, path: str, opset: int, **kw) -> None:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer chatter
        torch.onnx.export(
            module, args, path, opset_version=opset, dynamo=False, do_constant_folding=True, **kw
        )
    _maybe_external(path)


def _maybe_external(path: str) -> None:
    """Graphs over 2 GB keep their weights in `<file>.data` next to them (protobuf's limit)."""
    if os.path.getsize(path) < TWO_GB - 2**26 and not os.path.exists(path + ".data"):
        return
    m = onnx.load(path)
    onnx.save_model(
        m,
        path,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=os.path.basename(path) + ".data",
    )


def _export_vision(model: VisionLanguageModel, out: str, opset: int) -> dict:
    cfg = model.cfg
    size = cfg.vit_img_size
    pixels = torch.rand(2, 3, size, size)  # graph input stays fp32 whatever the precision
    graph = VisionEncoderGraph(model).eval()
    _onnx_export(
        graph,
        (pixels,),
        os.path.join(out, "vision_encoder.onnx"),
        opset,
        input_names=["pixel_values"],
        output_names=["image_embeds"],
        dynamic_axes={"pixel_values": {0: "num_images"}, "image_embeds": {0: "num_images"}},
    )
    return {"file": "vision_encoder.onnx"}


def _export_decoder(model: VisionLanguageModel, out: str, opset: int) -> dict:
    cfg = model.cfg
    B, S, P = 2, 3, 2
    dtype = next(model.parameters()).dtype
    kv = (B, cfg.lm_n_kv_heads, P, cfg.lm_head_dim)
    ids = torch.randint(0, cfg.lm_base_vocab_size, (B, S))
    img_id = cfg.image_slot_id
    ids[0, 1] = img_id  # trace the merge with one image row
    args = (
        ids,
        torch.rand(1, cfg.lm_hidden_dim),  # fp32 input, cast inside
        torch.ones(B, P + S, dtype=torch.long),
        torch.arange(P, P + S).repeat(B, 1),
        *[torch.rand(kv, dtype=dtype) for _ in range(2 * cfg.lm_n_blocks)],
    )
    inputs, outputs = decoder_io_names(cfg.lm_n_blocks)
    axes = {
        "input_ids": {0: "batch", 1: "seq"},
        "image_embeds": {0: "num_image_tokens"},
        "attention_mask": {0: "batch", 1: "total_seq"},
        "position_ids": {0: "batch", 1: "seq"},
        "logits": {0: "batch"},
    }
    for name in inputs[4:]:
        axes[name] = {0: "batch", 2: "past_seq"}
    for name in outputs[1:]:
        axes[name] = {0: "batch", 2: "total_seq"}
    path = os.path.join(out, "decoder.onnx")
    _onnx_export(
        DecoderGraph(model).eval(),
        args,
        path,
        opset,
        input_names=inputs,
        output_names=outputs,
        dynamic_axes=axes,
    )
    if cfg.lm_tie_weights:
        share_tied_head(path, "decoder.token_embedding.weight")
    return {"file": "decoder.onnx"}


def _export_fused(model: VisionLanguageModel, out: str, graph: str) -> dict:
    """One of the graphs written node by node in ONNX Runtime's contrib ops."""
    from .fused_decoder import build_fused_decoder
    from .fused_vision import build_fused_vision

    proto = (build_fused_decoder if graph == "decoder" else build_fused_vision)(model)
    name = f"{graph}.onnx"
    large = proto.ByteSize() > TWO_GB - 2**26
    onnx.save_model(
        proto,
        os.path.join(out, name),
        save_as_external_data=large,
        all_tensors_to_one_file=True,
        location=name + ".data",
    )
    return {"file": name}


def share_tied_head(path: str, embedding: str) -> None:
    """Store the tied embedding/head matrix once.

    The exporter writes the head as MatMul with a transposed copy of the embedding (constant
    folding of W.T): a second copy of the largest tensor. Rewrite it as Gemm(transB=1) reading
    the embedding initializer itself.
    """
    from onnx import numpy_helper

    m = onnx.load(path)
    inits = {i.name: i for i in m.graph.initializer}
    if embedding not in inits:
        raise ValueError(f"{path}: no initializer {embedding!r} to share with the head")
    emb = numpy_helper.to_array(inits[embedding])
    for k, node in enumerate(m.graph.node):
        if node.op_type != "MatMul" or node.input[1] not in inits:
            continue
        w = inits[node.input[1]]
        if tuple(w.dims) != emb.shape[::-1] or not np.array_equal(numpy_helper.to_array(w), emb.T):
            continue
        gemm = onnx.helper.make_node(
            "Gemm", [node.input[0], embedding], list(node.output), name=node.name + "_tied", transB=1
        )
        m.graph.node.remove(node)
        m.graph.node.insert(k, gemm)
        if not any(w.name in n.input for n in m.graph.node):
            m.graph.initializer.remove(w)
        onnx.save_model(m, path)
        return
    raise ValueError(f"{path}: could not find the tied head MatMul to share {embedding!r}")


def check_graph(path: str, opset: int) -> None:
    """onnx.checker + strict shape inference + no contrib/custom ops + the requested opset."""
    onnx.checker.check_model(path, full_check=True)
    m = onnx.load(path, load_external_data=False)
    versions = {o.domain: o.version for o in m.opset_import}
    if versions.get("", versions.get("ai.onnx")) != opset:
        raise ValueError(f"{path}: exported with opset {versions}, expected {opset}")
    foreign = sorted({n.op_type for n in m.graph.node if n.domain not in STANDARD_DOMAINS})
    if foreign:
        raise ValueError(f"{path}: non-standard ops {foreign}; the bundle must run on TensorRT 10.3")


def warn_tensorrt(path: str) -> None:
    """Log what TensorRT 10.3 (JetPack 6) would not parse in a graph meant for it."""
    from trt.check import check_model, target

    model = onnx.load(path, load_external_data=False)
    for problem in check_model(model, target("trt-10.3"), os.path.basename(path)):
        log.warning("TensorRT 10.3 would not parse %s", problem)


def check_fused_graph(path: str) -> None:
    """onnx.checker (the contrib ops are not in its schema set) + ONNX Runtime loads it on CPU."""
    import onnxruntime as ort

    onnx.checker.check_model(path)
    try:
        ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise ValueError(
            f"{path}: onnxruntime {ort.__version__} cannot load this fused graph ({e}); it needs "
            f"onnxruntime >= {FUSED_MIN_ORT} (GroupQueryAttention with attention_bias)"
        ) from None
