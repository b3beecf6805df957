"""Runtime vs transformers' own generate at SmolVLM-256M-Instruct's shapes, in one run.

    python -m benchmarks.smolvlm_speed [--max-new-tokens 64] [--repeats 2] [--json OUT]

Builds once (cached in .cache/) a random-weight Idefics3 checkpoint with SmolVLM-256M-Instruct's
shapes, written by transformers' save_pretrained: SigLIP-B/16 at 512 px (12 layers, 768 wide),
pixel shuffle 4 (64 image tokens per tile), the SmolLM2-135M decoder shape (30 layers, 576 wide,
9 heads, 3 KV heads) with SmolLM2's real tokenizer plus Idefics3's image tokens, and SmolVLM's
processor settings (long edge to 2048, 512 px tiles: a square photo is 16 tiles + a global view).
Random weights cost what real ones do. Exports it (standard and fused decoders), quantizes the
fused one (int8-dynamic, int4), then times, per system, time to first token (image processing
excluded for both: vision encoder + prefill) and decode tokens/s with EOS off, for one photo and
for a text-only prompt: transformers' Idefics3ForConditionalGeneration.generate (fp32, its default
attention) against the runtime's bundles.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(REPO, ".cache")
QUESTION = "Describe this picture in detail."


def build_checkpoint() -> str:
    """The random SmolVLM-256M-shaped checkpoint (transformers format), written once."""
    out = os.path.join(CACHE, "smolvlm-256m-shape")
    if os.path.exists(os.path.join(out, "model.safetensors")):
        return out
    from transformers import PreTrainedTokenizerFast

    from nanovlm.tools.smolvlm import write_smolvlm

    lm = os.path.join(CACHE, "smollm2-135m-instruct")
    if not os.path.exists(os.path.join(lm, "tokenizer.json")):
        from nanovlm.tools.smollm2 import build

        build(lm)
    tok = PreTrainedTokenizerFast(
        tokenizer_file=os.path.join(lm, "tokenizer.json"),
        eos_token="<end_of_utterance>",
        pad_token="<|endoftext|>",
        bos_token="<|im_start|>",
    )
    vision = dict(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        image_size=512,
        patch_size=16,
    )
    text = dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        rms_norm_eps=1e-5,
        max_position_embeddings=8192,
        rope_theta=100000.0,
    )
    write_smolvlm(out, tok, vision, text, scale_factor=4, image_seq_len=64, longest_edge=2048, tile=512)
    return out


def bundles(ckpt: str) -> dict[str, str]:
    from benchmarks.runtime_decode import cached
    from calibration.quantize import quantize_bundle
    from export.onnx_export import export_onnx

    root = os.path.join(CACHE, "bundles")
    out = {
        name: os.path.join(root, f"smolvlm-256m-shape-{name.replace(' ', '-')}")
        for name in ("fp32", "fused fp32", "fused int8-dynamic", "fused int8-w8a8", "fused int4")
    }
    if not cached(out["fp32"]):
        export_onnx(ckpt, out["fp32"], overwrite=True)
    if not cached(out["fused fp32"]):
        export_onnx(ckpt, out["fused fp32"], decoder="fused", overwrite=True)
    for mode in ("int8-dynamic", "int8-w8a8", "int4"):
        if not cached(out[f"fused {mode}"]):
            quantize_bundle(out["fused fp32"], out[f"fused {mode}"], mode, samples=8, overwrite=True)
    return out


def time_transformers(ckpt: str, picture, n: int, repeats: int) -> dict:
    import torch
    from transformers import Idefics3ForConditionalGeneration, Idefics3Processor

    torch.set_num_threads(os.cpu_count() or 1)
    model = Idefics3ForConditionalGeneration.from_pretrained(ckpt).eval()
    processor = Idefics3Processor.from_pretrained(ckpt)
    content = ([{"type": "image"}] if picture is not None else []) + [{"type": "text", "text": QUESTION}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = processor(text=prompt, images=[picture] if picture is not None else None, return_tensors="pt")

    def run(tokens: int) -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        return time.perf_counter() - t0

    run(2)  # warm-up
    first = min(run(1) for _ in range(repeats))
    full = min(run(n) for _ in range(repeats))
    return {
        "ttft_s": first,
        "decode_tokens_per_s": (n - 1) / (full - first),
        "prompt_positions": inputs["input_ids"].shape[1],
    }


def time_runtime(path: str, picture, n: int, repeats: int) -> dict:
    from runtime.pipeline import GenerationRequest, VLMPipeline

    pipe = VLMPipeline.from_bundle(path)
    batch = pipe.prepare([[picture] if picture is not None else []], [QUESTION])
    request = GenerationRequest(n, ignore_eos=True)
    runs = []
    for _ in range(repeats + 1):
        for _ in pipe.generate_ids(batch, request):
            pass
        runs.append(pipe.last_timings)
    runs = runs[1:]  # the first is warm-up
    return {
        "ttft_s": min(t.time_to_first_token_s for t in runs),
        "decode_tokens_per_s": statistics.median(t.decode_tokens_per_s for t in runs),
        "prompt_positions": runs[0].prompt_tokens,
    }


def main() -> None:
    from evaluation.bench import machine

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from PIL import Image
    from skimage import data

    ckpt = build_checkpoint()
    paths = bundles(ckpt)
    report = {"machine": machine(), "new_tokens": args.max_new_tokens, "rows": {}}
    for label, picture in (("photo", Image.fromarray(data.astronaut())), ("text only", None)):
        rows = {"transformers": time_transformers(ckpt, picture, args.max_new_tokens, args.repeats)}
        for name, path in paths.items():
            rows[f"runtime {name}"] = time_runtime(path, picture, args.max_new_tokens, args.repeats)
        report["rows"][label] = rows
    print(
        f"\n{report['machine']}, {args.max_new_tokens} new tokens (EOS off), SmolVLM-256M shapes, random weights\n"
    )
    print(
        "| prompt | system | positions | TTFT (s) | TTFT vs transformers | decode tok/s | decode vs transformers |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for label, rows in report["rows"].items():
        ref = rows["transformers"]
        for name, r in rows.items():
            print(
                f"| {label} | {name} | {r['prompt_positions']} | {r['ttft_s']:.3f} | {r['ttft_s'] / ref['ttft_s']:.2f}x | "
                f"{r['decode_tokens_per_s']:.1f} | {r['decode_tokens_per_s'] / ref['decode_tokens_per_s']:.2f}x |"
            )
    if args.json:
        from core.files import write_json

        write_json(args.json, report)


if __name__ == "__main__":
    main()
