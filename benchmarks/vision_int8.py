"""Vision encoder at INT8: the bundles' 8-bit MatMulNBits against onnxruntime's dynamic quantization.

    python benchmarks/vision_int8.py [--fp32 BUNDLE] [--int8 BUNDLE] [--repeats 7]

Times one image encode (1 x 3 x 224 x 224, 2 threads, median of --repeats after a warm-up) of the
nanoVLM-222M shape's SigLIP-B/16-shaped encoder, in one process: the fp32 bundle's graph, the
int8-dynamic bundle's graph (8-bit MatMulNBits), and the fp32 graph through onnxruntime's
`quantize_dynamic` (per-channel int8 weights; and 7-bit weights, which keep AVX2's u8 x s8 kernels
from saturating), written to a temporary directory. Cosine per image token against fp32, on one
random input. Bundles: built and cached by runtime_decode.py.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
BUNDLES = os.path.join(REPO, ".cache", "bundles")


def encode_time(path: str, x: np.ndarray, repeats: int) -> tuple[float, np.ndarray]:
    import onnxruntime as ort

    from runtime.onnx_backend import session_options

    s = ort.InferenceSession(path, session_options(2), providers=["CPUExecutionProvider"])
    feed = {s.get_inputs()[0].name: x}
    out = s.run(None, feed)[0]  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        s.run(None, feed)
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fp32", default=os.path.join(BUNDLES, "nanovlm-222m-shape-fused-fp32"))
    ap.add_argument("--int8", default=os.path.join(BUNDLES, "nanovlm-222m-shape-fused-int8-dynamic"))
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32 = os.path.join(args.fp32, "vision_encoder.onnx")
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        variants = {
            "fp32": fp32,
            "MatMulNBits 8-bit (int8 bundles)": os.path.join(args.int8, "vision_encoder.onnx"),
        }
        for name, reduce in (("dynamic int8, per channel", False), ("dynamic int8, 7-bit weights", True)):
            out = os.path.join(tmp, f"vision_{int(reduce)}.onnx")
            quantize_dynamic(fp32, out, weight_type=QuantType.QInt8, per_channel=True, reduce_range=reduce,
                             op_types_to_quantize=["MatMul"])  # fmt: skip
            variants[name] = out
        print("| vision encoder | encode (ms) | cosine min vs fp32 | size (MB) |\n| --- | --- | --- | --- |")
        ref = None
        for name, path in variants.items():
            t, out = encode_time(path, x, args.repeats)
            ref = out if ref is None else ref
            a, b = out.reshape(-1, out.shape[-1]), ref.reshape(-1, ref.shape[-1])
            cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
            size = os.path.getsize(path) / 2**20
            print(f"| {name} | {t * 1e3:.1f} | {cos.min():.5f} | {size:.0f} |")


if __name__ == "__main__":
    main()
