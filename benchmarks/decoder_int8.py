"""Which of SmolLM2's decoder MatMuls can take an integer GEMM, with SmoothQuant or without.

    python -m benchmarks.decoder_int8 [--kernels dynamic per-token] [--alphas 0.5 0.7 0.85]

DynamicQuantizeMatMul (one uint8 scale per activation tensor, an integer GEMM) runs a prefill's
and a batch's MatMuls 2-3x faster than the 8-bit MatMulNBits of today's int8-dynamic decoder
(benchmarks/matmul_kernels.py), but SmolLM2's outlier channels make one scale per tensor lose
(docs/quantization.md). Here, on the nanoVLM-222M shape with the real SmolLM2-135M-Instruct
decoder (the standard fp32 bundle of benchmarks/runtime_decode.py): the MatMuls that read an
RMSNorm's output (q/k/v, gate/up), and those plus down_proj (its input folds into up_proj's
columns), and all of them (out_proj too), go to DynamicQuantizeMatMul (one activation scale per
tensor, calibration/dynamic_int8.py) or per-token W8A8 (one per row, calibration/per_token_int8.py),
both with pair-limited weights, plain or after calibration/smoothquant.py's scale migration at each
alpha, calibrated on the
quantization report's 20 samples (10 photographs, 10 texts). Every other MatMul stays fp32, so
the KL is what these MatMuls add. Scored as the quantization report scores (metrics.compare
against fp32 PyTorch, 32 teacher-forced steps) on its 6 evaluation texts and 3 of its photos.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NORMED = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
TARGETS = {
    "q/k/v, gate/up": NORMED,
    "q/k/v, gate/up, down": (*NORMED, "down_proj"),
    "all (out_proj too)": (*NORMED, "down_proj", "out_proj"),
}
KERNELS = {"dynamic": "DynamicQuantizeMatMul", "per-token": "per-token W8A8"}


def named(node: str, parts: tuple[str, ...] | list[str]) -> bool:
    """Whether a decoder MatMul's name has one of `parts` (q_proj, down_proj, ...) as a path part."""
    return any(f"/{p}/" in node for p in parts)


def variant_bundle(
    src: str,
    feeds: list[dict],
    targets: tuple[str, ...],
    alpha: float | None,
    kernel: str = "dynamic",
    outliers: int = 0,
    rotate: int = 0,
    rotate_on: tuple[str, ...] = ("down_proj",),
    smooth_skip: tuple[str, ...] = (),
) -> str:
    """A copy of bundle `src` whose decoder runs the MatMuls named by `targets` in `kernel`'s integer
    GEMM, smoothed first at `alpha` (None: not smoothed; MatMuls named in `smooth_skip` never),
    per-token only: down_proj keeping its `outliers` largest input channels in float, and the
    inputs of the MatMuls named in `rotate_on` rotated by Hadamard blocks of `rotate`; -> its
    directory."""
    import onnx

    from calibration.dynamic_int8 import quantize_dynamic_int8
    from calibration.nbits import weight_matmuls
    from calibration.per_token_int8 import quantize_per_token
    from calibration.smoothquant import smooth
    from core.bundle import Manifest

    model = onnx.load(os.path.join(src, "decoder.onnx"))
    names = [n.name for n in weight_matmuls(model)]
    chosen = {n for n in names if named(n, targets)}
    if alpha is not None:
        smooth(model, feeds, alpha, only={n for n in chosen if not named(n, smooth_skip)})
    if kernel == "per-token":
        kept = {}
        if outliers:
            from calibration.importance import channel_stats
            from calibration.per_token_int8 import outlier_channels

            inputs = sorted(
                {
                    n.input[0]
                    for n in weight_matmuls(model)
                    if n.name in chosen and named(n.name, ("down_proj",))
                }
            )
            stats = channel_stats(model, inputs, feeds, "outlier channels")
            kept = {x: outlier_channels(stats[x]["max_abs"], outliers) for x in inputs}
        rotations = {}
        if rotate:
            rotations = {
                n.input[0]: rotate
                for n in weight_matmuls(model)
                if n.name in chosen and named(n.name, rotate_on)
            }
        quantize_per_token(model, lambda node: node.name in chosen, kept, rotations)
    else:
        quantize_dynamic_int8(model, exclude=[n for n in names if n not in chosen])
    out = tempfile.mkdtemp(prefix="decoder-int8-")
    for f in os.listdir(src):
        if not f.startswith(("decoder.onnx", "manifest.json")):
            os.link(os.path.join(src, f), os.path.join(out, f))  # a hard link stays inside the bundle
    onnx.save(
        model, os.path.join(out, "decoder.onnx"), save_as_external_data=True, location="decoder.onnx.data"
    )
    with open(os.path.join(src, "manifest.json")) as f:
        Manifest.from_dict(json.load(f), src).write(out)  # the files as they are now, hashed
    return out


def main() -> None:
    import skimage.data
    from PIL import Image

    from benchmarks.quantization_report import EVAL_PHOTOS, EVAL_TEXTS, photo_folder
    from benchmarks.runtime_decode import build_bundle, build_checkpoint
    from calibration.data import load_calibration
    from calibration.recorder import record_feeds
    from core.bundle import load_bundle
    from evaluation import metrics, parity
    from evaluation.bench import machine
    from runtime.pipeline import VLMPipeline

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.5, 0.7, 0.85])
    ap.add_argument("--kernels", nargs="+", choices=list(KERNELS), default=list(KERNELS))
    ap.add_argument("--targets", nargs="+", choices=list(TARGETS), default=list(TARGETS))
    ap.add_argument(
        "--outliers",
        type=int,
        nargs="+",
        default=[0],
        help="per-token: down_proj's largest input channels kept in float (0: none), each a row",
    )
    ap.add_argument(
        "--rotate",
        type=int,
        nargs="+",
        default=[0],
        help="per-token: --rotate-on's inputs rotated by Hadamard blocks of this size (0: none), each a row",
    )
    ap.add_argument(
        "--rotate-on",
        nargs="+",
        default=["down_proj"],
        help="per-token: the MatMuls whose inputs --rotate rotates",
    )
    ap.add_argument("--smooth-skip", nargs="*", default=[], help="MatMuls left unsmoothed (e.g. down_proj)")
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    ckpt = build_checkpoint()
    src = os.path.realpath(build_bundle(ckpt))
    _, feeds = record_feeds(load_bundle(src), load_calibration(photo_folder(), 20), 4)
    cases = [metrics.Case([], t) for t in EVAL_TEXTS]
    cases += [
        metrics.Case([Image.fromarray(getattr(skimage.data, k)())], p)
        for k, p in list(EVAL_PHOTOS.items())[:3]
    ]
    reference = parity.Reference(ckpt)
    rows = []
    for kernel in a.kernels:
        for label in a.targets:
            for alpha, outliers, rotate in [
                (al, o, r) for al in [None, *a.alphas] for o in a.outliers for r in a.rotate
            ]:
                if (outliers or rotate) and kernel != "per-token":
                    continue
                path = variant_bundle(
                    src,
                    feeds,
                    TARGETS[label],
                    alpha,
                    kernel,
                    outliers,
                    rotate,
                    tuple(a.rotate_on),
                    tuple(a.smooth_skip),
                )
                try:
                    s = metrics.compare(VLMPipeline.from_bundle(path, verify=False), reference, cases, 32)
                finally:
                    shutil.rmtree(path)
                rows.append(
                    (KERNELS[kernel], label, "none" if alpha is None else f"{alpha:g}", outliers, rotate, s)
                )
                print(
                    f"... {KERNELS[kernel]} on {label}, smoothing {rows[-1][2]}, {outliers} float channels, "
                    f"rotation {rotate}: "
                    f"KL {s['kl_mean']:.4f}",
                    flush=True,
                )
    print(f"\n{machine(os.cpu_count() or 1)}; KL vs fp32 PyTorch over {len(cases)} cases x 32 steps\n")
    print(
        "| kernel | on | SmoothQuant alpha | down_proj channels in float | down_proj Hadamard block | KL | top-1 "
        "| exact match |\n|---|---|---|---|---|---|---|---|"
    )
    for kernel, label, alpha, outliers, rotate, s in rows:
        print(
            f"| {kernel} | {label} | {alpha} | {outliers} | {rotate or '-'} | {s['kl_mean']:.4f} | {s['top1_agreement']:.3f} "
            f"| {s['exact_match']:.2f} |"
        )


if __name__ == "__main__":
    main()
