"""The first photo: image encode, time to first token and decode speed, ours against llama.cpp.

    python -m benchmarks.first_photo [--max-new-tokens 32] [--repeats 2] [--json OUT] [--plot PNG]

One run, 2 threads each, on the SmolVLM-256M shape (random weights, real cost; built and cached by
benchmarks/smolvlm_speed.py) and the scikit-image astronaut (512x512): at SmolVLM's own settings a
4x4 grid of 512 px tiles plus a global view, 17 views of 1,024 patches.

Ours: the fp32 bundle with the standard graphs (the before), and the fused bundles (fused decoder
and vision encoder) at fp32, int8-dynamic and int4, at resolution budgets (--image-tiles) of 4
(the checkpoint's), 2 (2x2 + global: 5 views) and 1 (one view). llama.cpp: `llama-mtmd-cli` built
from the llama-cpp-python sdist (benchmarks/llama_server.py), the text model at Q8_0 and the
vision projector at f32 and f16, from the same checkpoint with llama.cpp's own converter, at its
default slicing. EOS off on both sides.

Time to first token excludes image decoding and tiling on both sides: ours is the pipeline's
image_encode_s + prefill_s; llama.cpp's is a 1-token run's wall time from its first "encoding
mtmd batch" log line to exit. Decode tokens/s is ours only: llama-mtmd-cli prints no decode
timing, and two runs' difference drowns in its image encode's run-to-run spread (seconds); its
decode speed on these weights is benchmarks/head_to_head.py's and serve_bench.py's. Per-view encode: ours image_encode_s / views; llama.cpp's the median of its
"mtmd batch encoding done in" lines (one view each). The int8 bound per view is the encoder's
operations at the best rate one int8 GEMM of its largest shape reaches here (ONNX Runtime's
DynamicQuantizeMatMul, 1,024 x 768 x 3,072): a ceiling the kernels can reach, not the datasheet's.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUESTION = "Describe this picture in detail."
BUDGETS = (4, 2, 1)
THREADS = 2


# ----------------------------------------------------------------------------- ours
def time_ours(path: str, picture, tiles: int, n: int, repeats: int) -> dict:
    from runtime.pipeline import GenerationRequest, VLMPipeline

    pipe = VLMPipeline.from_bundle(path, threads=THREADS)
    batch = pipe.prepare([[picture]], [QUESTION], image_tiles=tiles)
    runs = []
    for _ in range(repeats + 1):
        for _ in pipe.generate_ids(batch, GenerationRequest(n, ignore_eos=True)):
            pass
        runs.append(pipe.last_timings)
    runs = runs[1:]  # the first is warm-up
    best = min(runs, key=lambda t: t.time_to_first_token_s)
    views = int(batch.pixel_values.shape[0])
    return {
        "views": views,
        "positions": best.prompt_tokens,
        "encode_per_view_s": best.image_encode_s / views,
        "prefill_s": best.prefill_s,
        "ttft_s": best.time_to_first_token_s,
        "decode_tokens_per_s": statistics.median(t.decode_tokens_per_s for t in runs),
    }


def vision_cosine(path: str) -> float | None:
    """The quantizer's recorded lowest vision cosine against fp32, if the bundle is quantized."""
    from core.bundle import load_bundle

    plan = load_bundle(path).manifest.quantization or {}
    return (plan.get("vision_check") or {}).get("cosine_min")


# ----------------------------------------------------------------------------- the int8 ceiling
def encoder_ops(cfg) -> float:
    """Multiply-adds x 2 of one view through the encoder and projector."""
    T, D, inter = cfg.vit_grid**2, cfg.vit_hidden_dim, cfg.vit_inter_dim
    layer = 2 * T * (4 * D * D + 2 * D * inter) + 4 * T * T * D  # projections + QK^T and PV
    patches = 2 * T * 3 * cfg.vit_patch_size**2 * D
    f2 = cfg.mp_pixel_shuffle_factor**2
    return cfg.vit_n_blocks * layer + patches + 2 * (T // f2) * D * f2 * cfg.lm_hidden_dim


def int8_gemm_rate(rows: int = 1024, k: int = 768, n: int = 3072, repeats: int = 20) -> float:
    """Operations/s of ONNX Runtime's DynamicQuantizeMatMul at [rows, k] x [k, n], best of repeats."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from runtime.onnx_backend import session_options

    rng = np.random.default_rng(0)
    b = numpy_helper.from_array(rng.integers(-63, 64, (k, n), dtype=np.int8), "B")
    scale = numpy_helper.from_array(np.full(n, 0.01, np.float32), "scale")
    node = helper.make_node("DynamicQuantizeMatMul", ["A", "B", "scale"], ["Y"], domain="com.microsoft")
    graph = helper.make_graph(
        [node],
        "gemm",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [rows, k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [rows, n])],
        [b, scale],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    s = ort.InferenceSession(
        model.SerializeToString(), session_options(THREADS), providers=["CPUExecutionProvider"]
    )
    a = {"A": rng.standard_normal((rows, k)).astype(np.float32)}
    s.run(None, a)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        s.run(None, a)
        best = min(best, time.perf_counter() - t)
    return 2 * rows * k * n / best


# ----------------------------------------------------------------------------- llama.cpp
ENCODED = re.compile(r"mtmd batch encoding done in (\d+) ms")
STAMP = re.compile(r"^(\d+)\.(\d+)\.(\d+)\.(\d+) I encoding mtmd batch", re.M)


def _mtmd(text: str, mmproj: str, photo: str, n: int) -> tuple[float, list[float]]:
    """(seconds from the first image encode to exit, per-view encode seconds) of one run."""
    from benchmarks.llama_server import server_binary

    cli = os.path.join(os.path.dirname(server_binary()), "llama-mtmd-cli")
    cmd = [cli, "-m", text, "--mmproj", mmproj, "--image", photo, "-p", QUESTION, "-n", str(n)]
    cmd += ["--temp", "0", "-t", str(THREADS), "--ignore-eos"]
    t0 = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t0
    first = STAMP.search(run.stderr)
    if first is None:
        raise RuntimeError(f"llama-mtmd-cli printed no image encode line:\n{run.stderr[-2000:]}")
    m, s, ms, us = (int(x) for x in first.groups())
    started = m * 60 + s + ms / 1e3 + us / 1e6  # the log clock (min.s.ms.us) counts from the start
    return wall - started, [int(x) / 1000 for x in ENCODED.findall(run.stderr)]


def time_llamacpp(text: str, mmproj: str, photo: str, repeats: int) -> dict:
    first, encodes = min((_mtmd(text, mmproj, photo, 1) for _ in range(repeats)), key=lambda r: r[0])
    return {
        "views": len(encodes),
        "positions": None,
        "encode_per_view_s": statistics.median(encodes),
        "prefill_s": first - sum(encodes),
        "ttft_s": first,
        "decode_tokens_per_s": None,  # its image encode varies by seconds between runs: see the docstring
    }


# ----------------------------------------------------------------------------- report
def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from core.files import atomic_write

    rows = report["rows"]
    names = list(rows)
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(names) + 1.2))
    ax.barh(names[::-1], [rows[k]["ttft_s"] for k in names[::-1]], color="#4c72b0")
    for i, k in enumerate(names[::-1]):
        ax.text(rows[k]["ttft_s"], i, f" {rows[k]['ttft_s']:.1f} s ({rows[k]['views']} views)", va="center")
    ax.set_xlabel("time to first token, s (astronaut photo)")
    ax.set_title(f"SmolVLM-256M shape: {report['machine']}", fontsize=9)
    ax.set_xlim(0, max(r["ttft_s"] for r in rows.values()) * 1.35)
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


def main() -> None:
    from PIL import Image
    from skimage import data

    from benchmarks.llama_server import ggufs, mmproj_gguf
    from benchmarks.smolvlm_speed import build_checkpoint, bundles
    from core.bundle import load_bundle
    from evaluation.bench import machine

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-llamacpp", action="store_true", help="ours only (no llama.cpp build)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None, help="write the TTFT chart (PNG) here")
    args = ap.parse_args()
    if args.max_new_tokens < 2 or args.repeats < 1:
        ap.error("--max-new-tokens must be at least 2 and --repeats at least 1")

    picture = Image.fromarray(data.astronaut())
    ckpt = build_checkpoint()
    paths = bundles(ckpt)
    report = {"machine": machine(), "new_tokens": args.max_new_tokens, "rows": {}}
    rows = report["rows"]
    n, r = args.max_new_tokens, args.repeats
    rows["ours fp32, standard graphs, image_tiles 4"] = time_ours(paths["fp32"], picture, 4, n, r)
    for tiles in BUDGETS:
        for name in ("fused fp32", "fused int8-dynamic", "fused int4"):
            row = time_ours(paths[name], picture, tiles, n, r)
            rows[f"ours {name}, image_tiles {tiles}"] = row | {"vision_cosine": vision_cosine(paths[name])}
            print(f"{name}, {tiles} tiles: TTFT {row['ttft_s']:.2f} s", flush=True)
    if not args.no_llamacpp:
        import tempfile

        text, mmproj = ggufs(ckpt)
        with tempfile.TemporaryDirectory() as tmp:
            photo = os.path.join(tmp, "astronaut.png")
            picture.save(photo)
            for kind, proj in (("f32", mmproj), ("f16", mmproj_gguf(ckpt, "f16"))):
                rows[f"llama.cpp Q8_0 + {kind} mmproj"] = time_llamacpp(text, proj, photo, r)
                print(
                    f"llama.cpp {kind}: TTFT {rows[f'llama.cpp Q8_0 + {kind} mmproj']['ttft_s']:.2f} s",
                    flush=True,
                )

    cfg = load_bundle(paths["fp32"]).config
    ops, rate = encoder_ops(cfg), int8_gemm_rate()
    report |= {
        "encoder_gop_per_view": ops / 1e9,
        "int8_gemm_gops": rate / 1e9,
        "int8_bound_per_view_s": ops / rate,
    }
    print(f"\n{report['machine']}; 2 threads; {n} new tokens (EOS off); SmolVLM-256M shape, astronaut photo")
    print(
        f"encoder: {ops / 1e9:.0f} GOP per view; int8 GEMM ceiling here {rate / 1e9:.0f} GOP/s "
        f"-> int8 bound {ops / rate:.3f} s per view\n"
    )
    ref = rows.get("llama.cpp Q8_0 + f32 mmproj")
    print(
        "| system | views | encode / view (s) | vs int8 bound | TTFT (s) | TTFT vs llama.cpp | decode tok/s | vision cosine |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, row in rows.items():
        vs = f"{row['ttft_s'] / ref['ttft_s']:.2f}x" if ref else "-"
        cos, tps = row.get("vision_cosine"), row["decode_tokens_per_s"]
        print(
            f"| {name} | {row['views']} | {row['encode_per_view_s']:.3f} | "
            f"{row['encode_per_view_s'] / (ops / rate):.1f}x | {row['ttft_s']:.2f} | {vs} | "
            f"{'-' if tps is None else f'{tps:.1f}'} | {'-' if cos is None else f'{cos:.4f}'} |"
        )
    if args.json:
        from core.files import write_json

        write_json(args.json, report)
    if args.plot:
        plot(report, args.plot)


if __name__ == "__main__":
    main()
