"""ONNX Runtime's CPU MatMul kernels on SmolLM2-135M's layer shapes, at the rows of a prefill.

    python -m benchmarks.matmul_kernels [--rows 1 85 196] [--rounds 7]

One decoder layer's seven weight MatMuls (q, k, v, out; gate, up, down) with random weights, as
one graph per kernel: fp32 MatMul, MatMulNBits at 8 and 4 bits (blocks of 32, int8 compute),
DynamicQuantizeMatMul, and per-token W8A8 (calibration/per_token_int8.py: one activation
quantization per input, shared by q/k/v and by gate/up, as in the decoder). Prints the median time of the seven x 30 layers, in ms. One layer's
weights fit in the caches, so the 1-row figures are not decode speeds (that is
benchmarks/head_to_head.py); at a prefill's rows the GEMMs are compute-bound and these are
the kernels' speeds. Run it under benchmarks/avx2_proxy.py for an AVX2-only CPU's kernels.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HIDDEN, INTER = 576, 1536
SHAPES = [
    (HIDDEN, HIDDEN),
    (HIDDEN, 192),
    (HIDDEN, 192),
    (HIDDEN, HIDDEN),
    (HIDDEN, INTER),
    (HIDDEN, INTER),
    (INTER, HIDDEN),
]
INPUTS = ("x_qkv", "x_qkv", "x_qkv", "x_out", "x_mlp", "x_mlp", "x_down")  # what each MatMul reads
LAYERS = 30
KERNELS = ("fp32 MatMul", "MatMulNBits 8-bit", "MatMulNBits 4-bit", "DynamicQuantizeMatMul", "per-token W8A8")


def layer_graph(kernel: str, rows: int, rng: np.random.Generator):
    """The seven MatMuls of one layer, each reading the graph input its decoder MatMul reads."""
    from onnx import TensorProto, helper, numpy_helper

    from calibration.dynamic_int8 import quantize_pairs
    from calibration.per_token_int8 import quantize_per_token

    nodes, inits = [], []
    for i, (k, n) in enumerate(SHAPES):
        x, w = INPUTS[i], rng.standard_normal((k, n)).astype(np.float32) * 0.05
        if kernel in ("fp32 MatMul", "per-token W8A8"):
            inits.append(numpy_helper.from_array(w, f"w{i}"))
            nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"y{i}"]))
        elif kernel == "DynamicQuantizeMatMul":
            q, scale = quantize_pairs(w)
            inits += [numpy_helper.from_array(q, f"w{i}"), numpy_helper.from_array(scale, f"s{i}")]
            nodes.append(
                helper.make_node(
                    "DynamicQuantizeMatMul", [x, f"w{i}", f"s{i}"], [f"y{i}"], domain="com.microsoft"
                )
            )
        else:  # random packed codes: the kernel's speed does not depend on them
            bits, block = (8 if "8-bit" in kernel else 4), 32
            packed = rng.integers(0, 256, (n, k // block, block * bits // 8), dtype=np.uint8)
            inits += [
                numpy_helper.from_array(packed, f"w{i}"),
                numpy_helper.from_array(np.full(n * k // block, 0.01, np.float32), f"s{i}"),
            ]
            nodes.append(
                helper.make_node(
                    "MatMulNBits",
                    [x, f"w{i}", f"s{i}"],
                    [f"y{i}"],
                    domain="com.microsoft",
                    K=k,
                    N=n,
                    bits=bits,
                    block_size=block,
                    accuracy_level=4,
                )
            )
    widths = {x: k for x, (k, _) in zip(INPUTS, SHAPES, strict=True)}
    inputs = [helper.make_tensor_value_info(x, TensorProto.FLOAT, [rows, k]) for x, k in widths.items()]
    outputs = [
        helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [rows, n])
        for i, (_, n) in enumerate(SHAPES)
    ]
    model = helper.make_model(
        helper.make_graph(nodes, "layer", inputs, outputs, inits),
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
    )
    return quantize_per_token(model) if kernel == "per-token W8A8" else model


def time_kernel(kernel: str, rows: int, rounds: int) -> float:
    """Median over rounds of one layer's seven MatMuls x LAYERS, in seconds."""
    import onnxruntime as ort

    from runtime.onnx_backend import session_options

    rng = np.random.default_rng(0)
    session = ort.InferenceSession(
        layer_graph(kernel, rows, rng).SerializeToString(),
        session_options(),
        providers=["CPUExecutionProvider"],
    )
    feed = {
        x: rng.standard_normal((rows, k)).astype(np.float32) for x, (k, _) in zip(INPUTS, SHAPES, strict=True)
    }
    for _ in range(3):
        session.run(None, feed)
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(10):
            session.run(None, feed)
        times.append((time.perf_counter() - t0) / 10 * LAYERS)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 85, 196])
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    if min(args.rows) < 1 or args.rounds < 1:
        ap.error("--rows and --rounds must be at least 1")
    from evaluation.bench import machine

    print(f"SmolLM2-135M layer MatMuls x {LAYERS} layers, ms (median of {args.rounds}), {machine()}\n")
    print("| rows | " + " | ".join(KERNELS) + " |\n| --- |" + " --- |" * len(KERNELS))
    for rows in args.rows:
        cells = [f"{1e3 * time_kernel(k, rows, args.rounds):.1f}" for k in KERNELS]
        print(f"| {rows} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
