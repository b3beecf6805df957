"""The vision encoder at INT8: 8-bit MatMulNBits against DynamicQuantizeMatMul with three weight grids.

    python -m benchmarks.vision_int8 [--fp32 BUNDLE] [--repeats 9]

Times one image encode (1 x 3 x 224 x 224, 2 threads, median of --repeats after a warm-up) of the
nanoVLM-222M shape's SigLIP-B/16-shaped encoder, each variant made from the fp32 bundle's graph
in a temporary directory and timed in this one process:

- 8-bit MatMulNBits in blocks of 32 (int4-fp16's vision encoder; the CPU recipes' before);
- DynamicQuantizeMatMul with pair-limited int8 weights (the CPU recipes': calibration/dynamic_int8.py);
- DynamicQuantizeMatMul with 7-bit weights, [-63, 63] per column (portable, less accurate);
- DynamicQuantizeMatMul with 8-bit weights, [-127, 127] per column (saturates without VNNI).

Cosine per image token against fp32, on one random input. The fp32 bundle is built and cached
by runtime_decode.py.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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


def per_column(qmax: int):
    """Symmetric round-to-nearest int8 weights on [-qmax, qmax], one scale per column."""

    def quantize(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        amax = np.abs(w).max(0)
        scale = np.where(amax > 0, amax / qmax, 1.0).astype(np.float32)
        return np.clip(np.rint(w / scale), -qmax, qmax).astype(np.int8), scale

    return quantize


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fp32", default=os.path.join(BUNDLES, "nanovlm-222m-shape-fused-fp32"))
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args()
    import onnx

    from calibration.dynamic_int8 import quantize_dynamic_int8, quantize_pairs
    from calibration.nbits import quantize_nbits

    fp32 = os.path.join(args.fp32, "vision_encoder.onnx")
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    makers = {
        "8-bit MatMulNBits, blocks of 32": lambda m: quantize_nbits(m, 8),
        "DynamicQuantizeMatMul, pair-limited (the CPU recipes')": lambda m: quantize_dynamic_int8(
            m, weights=quantize_pairs
        ),
        "DynamicQuantizeMatMul, 7-bit [-63, 63]": lambda m: quantize_dynamic_int8(m, weights=per_column(63)),
        "DynamicQuantizeMatMul, 8-bit [-127, 127], not portable": lambda m: quantize_dynamic_int8(
            m, weights=per_column(127)
        ),
    }
    with tempfile.TemporaryDirectory() as tmp:
        variants = {"fp32": fp32}
        for i, (name, make) in enumerate(makers.items()):
            variants[name] = os.path.join(tmp, f"vision_{i}.onnx")
            onnx.save(make(onnx.load(fp32)), variants[name])
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
