"""Accuracy, size and speed of every quantization mode against fp32, on two models, in one run:
each mode of the standard bundle, then the fused-decoder bundle (`--decoder fused`) and its modes.

    python -m benchmarks.quantization_report [--models smollm2,tiny] [--json docs/quantization_report.json]
    python -m benchmarks.quantization_report --models smollm2 --modes int8-static --skip-speed   # one mode

smollm2  the nanoVLM-222M shape with the real SmolLM2-135M-Instruct decoder (built as in
         runtime_decode.py). Calibrated on 10 scikit-image photographs with varied prompts and 10 text-only prompts;
         evaluated on 6 other photographs and 6 text-only prompts: teacher-forced KL and top-1
         over 32 greedy steps each, greedy exact match; decode speed of every bundle and of
         llama.cpp (f32 and Q4_1 GGUF of the same weights) in the same run.
tiny     the trained default (artifacts/tiny, from `make demo`): task accuracy on 600 built-in
         test questions, KL and top-1 on the answer tokens.

Accuracy is against the fp32 PyTorch model. Bundles are cached under .cache/bundles.
"""

from __future__ import annotations

import argparse
import json
import logging
import os

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(REPO, ".cache")

CALIBRATION_PHOTOS = (
    "brick",
    "camera",
    "cell",
    "clock",
    "coins",
    "grass",
    "gravel",
    "moon",
    "page",
    "hubble_deep_field",
)
CALIBRATION_PROMPTS = [
    "Describe this image.",
    "What is shown in this picture?",
    "Write a short caption for this photo.",
    "What colours and textures do you see?",
    "Is there any text in the image? What does it say?",
    "Describe the lighting and the background.",
    "What might this image be used for?",
    "List the objects you can see.",
]
CALIBRATION_TEXTS = [  # text-only calibration prompts (texts.txt), none of them an evaluation prompt
    "A long time ago, in a small village by the river, there lived a carpenter who built boats.",
    "The stock market fell sharply on Monday as investors worried about rising interest rates.",
    "Write a Python function that returns the n-th Fibonacci number.",
    "What are the main causes of inflation, and how do central banks respond to it?",
    "Write a polite email to a colleague asking to move tomorrow's meeting to Friday afternoon.",
    "Give me a list of five healthy breakfast ideas that take less than ten minutes.",
    "Translate into French: The train leaves at seven o'clock from platform four.",
    "Why do cats purr? Answer in two or three sentences.",
    "Explain the rules of chess to a ten-year-old.",
    "Tell me a joke about programmers.",
]
EVAL_PHOTOS = {
    "astronaut": "Describe the person in this photo and what they are wearing.",
    "chelsea": "What animal is this and what is it doing?",
    "coffee": "What is on the table in this picture?",
    "rocket": "Describe this scene in a few sentences.",
    "immunohistochemistry": "What kind of image is this?",
    "retina": "Describe the structures visible in this image.",
}
# A check set that no recipe was chosen on (the int4 recipe was tuned on the evaluation set above,
# so its margin there is optimistic): other skimage pictures, other prompts. KL and top-1 only.
CHECK_PICTURES = {
    "motorcycle_left.png": "What vehicle is this?",
    "color.png": "Describe the colours in this image.",
    "logo.png": "What does this logo show?",
    "chessboard_RGB.png": "What pattern is this?",
    "microaneurysms.png": "What kind of medical image is this?",
    "text.png": "What does the text say?",
}
CHECK_TEXTS = [
    "What is the capital of Australia, and why was it chosen?",
    "Write a haiku about autumn leaves.",
    "How does a refrigerator keep food cold?",
    "List three differences between Python lists and tuples.",
    "Give advice to someone starting to learn the guitar.",
    "What happened during the French Revolution?",
]
EVAL_TEXTS = [
    "Explain in simple words why the sky is blue.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "What are three tips for cooking rice well?",
    "Summarise the water cycle in a few sentences.",
    "How do I reverse a list in Python?",
    "What is the difference between a virus and a bacterium?",
]


def photo_folder() -> str:
    from PIL import Image
    from skimage import data

    folder = os.path.join(CACHE, "calibration-photos")
    os.makedirs(folder, exist_ok=True)
    for name in CALIBRATION_PHOTOS:
        if not os.path.exists(os.path.join(folder, f"{name}.png")):
            Image.fromarray(getattr(data, name)()).save(os.path.join(folder, f"{name}.png"))
    for file, lines in (("prompts.txt", CALIBRATION_PROMPTS), ("texts.txt", CALIBRATION_TEXTS)):
        with open(os.path.join(folder, file), "w") as f:
            f.write("\n".join(lines) + "\n")
    return folder


def variants(
    ckpt: str, fp32: str, name: str, calibration: str, samples: int, modes: list[str] | None = None
) -> dict[str, str]:
    """Every mode of the standard bundle `fp32`, then the fused-decoder export and its CPU modes
    (or only the labels in `modes`, fp32 always included)."""
    from benchmarks.runtime_decode import cached
    from calibration.quantize import quantize_bundle
    from core.recipes import FUSED_MODES, QUANTIZE_MODES
    from export.onnx_export import export_onnx

    out = {"fp32": fp32}
    fused = os.path.join(CACHE, "bundles", f"{name}-fused-fp32")
    if any(m.startswith("fused") for m in modes or ["fused"]) and not cached(fused):
        export_onnx(ckpt, fused, decoder="fused", overwrite=True)
    jobs = [(mode, fp32, mode) for mode in QUANTIZE_MODES] + [("fused fp32", None, None)]
    jobs += [(f"fused {mode}", fused, mode) for mode in FUSED_MODES]
    if modes:
        jobs = [j for j in jobs if j[0] in modes]
    for label, src, mode in jobs:
        path = os.path.join(CACHE, "bundles", f"{name}-{label.replace(' ', '-')}")
        if src and not cached(path):
            logging.info("quantizing %s -> %s", name, label)
            quantize_bundle(src, path, mode, calibration=calibration, samples=samples, overwrite=True)
        out[label] = path
    return out


def accuracy(
    paths: dict[str, str], reference, cases, max_new_tokens: int, label: str = ""
) -> dict[str, dict]:
    """{mode: metrics.compare's summary, its per-case "rows" included, + bundle bytes}."""
    from evaluation import metrics
    from runtime.pipeline import VLMPipeline

    out = {}
    for mode, path in paths.items():
        pipe = VLMPipeline.from_bundle(path)
        s = metrics.compare(pipe, reference, cases, max_new_tokens, desc=mode + label)
        decoder = pipe.bundle.graph_path("decoder")
        decoder_bytes = sum(os.path.getsize(f) for f in (decoder, decoder + ".data") if os.path.exists(f))
        out[mode] = s | {"bytes": pipe.bundle.total_bytes(), "decoder_bytes": decoder_bytes}
        logging.info(
            "%s%s: KL %.4g top-1 %.3f exact %.2f",
            mode,
            label,
            s["kl_mean"],
            s["top1_agreement"],
            s["exact_match"],
        )
    return out


def kl_top1(summary: dict) -> dict[str, float]:
    return {"kl_mean": summary["kl_mean"], "top1_agreement": summary["top1_agreement"]}


def without_rows(summaries: dict[str, dict]) -> dict[str, dict]:
    return {mode: {k: v for k, v in s.items() if k != "rows"} for mode, s in summaries.items()}


def smollm2(args) -> dict:
    import skimage.data
    from PIL import Image

    from benchmarks.runtime_decode import PROMPT, build_bundle, build_checkpoint
    from core.processors import load_image
    from evaluation import metrics, parity
    from evaluation.bench import bench

    ckpt = build_checkpoint()
    paths = variants(ckpt, build_bundle(ckpt), "nanovlm-222m-shape", photo_folder(), 20, args.modes)
    cases = [metrics.Case([Image.fromarray(getattr(skimage.data, k)())], p) for k, p in EVAL_PHOTOS.items()]
    cases += [metrics.Case([], t) for t in EVAL_TEXTS]
    folder = os.path.dirname(skimage.data.__file__)
    check = [metrics.Case([load_image(os.path.join(folder, f))], p) for f, p in CHECK_PICTURES.items()]
    check += [metrics.Case([], t) for t in CHECK_TEXTS]
    reference = parity.Reference(ckpt)  # one PyTorch run per case, shared by every comparison below
    summaries = accuracy(paths, reference, cases, 32)
    result = {"accuracy": without_rows(summaries)}
    if not args.skip_speed:
        speed = bench(list(paths.values()), None, None, PROMPT, args.max_new_tokens, args.repeats, None, ())
        result["speed"] = {mode: row for mode, row in zip(paths, speed["rows"], strict=True)}
        result["llama_cpp"] = llama_cpp_speed(ckpt, speed["rows"][0]["prompt_positions"], args)
    text = len(EVAL_PHOTOS)  # the text prompts' rows of the comparison above
    result["text_only"] = {
        mode: kl_top1(metrics.summarize(s["rows"][text:])) for mode, s in summaries.items()
    }
    result["text_only"] |= llama_cpp_text_kl(reference, paths["fp32"], cases[text:])
    # a check set no recipe was chosen on: KL and top-1 only
    result["check_set"] = {
        mode: kl_top1(s) for mode, s in accuracy(paths, reference, check, 32, " (check set)").items()
    }
    return result


def llama_cpp_text_kl(reference, fp32: str, cases: list) -> dict[str, dict]:
    """KL vs fp32 PyTorch of llama.cpp's GGUFs on the text prompts (teacher-forced along PyTorch's
    greedy answer; over the base vocabulary, the GGUF's); {} without llama.cpp or the GGUFs."""
    from evaluation import metrics
    from runtime.pipeline import VLMPipeline

    try:
        from benchmarks.llamacpp import forced_logits
    except ImportError:
        return {}
    pipe = VLMPipeline.from_bundle(fp32)  # the tokenizer and image processor PyTorch's runs use
    ggufs = {
        name: os.path.join(CACHE, f)
        for name, f in (
            ("llama.cpp f32", "smollm2-135m-f32.gguf"),
            ("llama.cpp Q4_1", "smollm2-135m-q4_1.gguf"),
        )
    }
    out = {}
    for name, gguf_path in ggufs.items():
        if not os.path.exists(gguf_path):
            continue
        kls, agree = [], []
        for case in cases:
            run = reference.run(pipe, case, 32)
            ref = run["logits"]
            got = forced_logits(gguf_path, run["batch"].input_ids[0].tolist(), run["tokens"])
            base = got.shape[1]  # the extra image tokens have no row in the GGUF
            kls += list(metrics.kl_divergence(ref[:, :base], got))
            agree += list(ref[:, :base].argmax(-1) == got.argmax(-1))
        out[name] = {"kl_mean": float(np.mean(kls)), "top1_agreement": float(np.mean(agree))}
    return out


def llama_cpp_speed(ckpt: str, positions: int, args) -> dict:
    try:
        import gguf  # noqa: F401
        import llama_cpp  # noqa: F401
    except ImportError as e:
        return {"skipped": f"llama.cpp not installed ({e}); pip install llama-cpp-python gguf"}
    from benchmarks.llamacpp import cached_ggufs, decode_speed, prompt_ids
    from benchmarks.runtime_decode import PROMPT
    from evaluation.bench import spread

    lm = os.path.join(CACHE, "smollm2-135m-instruct")
    f32, q41 = cached_ggufs(CACHE)
    ids = prompt_ids(os.path.join(lm, "tokenizer.json"), PROMPT, positions)
    out = {}
    for name, path in (("llama.cpp f32", f32), ("llama.cpp Q4_1", q41)):
        runs = [
            decode_speed(path, ids, args.max_new_tokens, threads=os.cpu_count() or 1)
            for _ in range(args.repeats + 1)
        ][1:]
        rates = [r["decode_tokens_per_s"] for r in runs]
        out[name] = {"decode_tokens_per_s": spread(rates), "bytes": os.path.getsize(path)}
    return out


def tiny(args) -> dict:
    from evaluation import metrics, parity

    root = os.path.join(REPO, "artifacts", "tiny")
    ckpt, fp32 = os.path.join(root, "checkpoint"), os.path.join(root, "bundle")
    if not os.path.exists(os.path.join(fp32, "manifest.json")):
        raise SystemExit(
            "artifacts/tiny/bundle not found: run `make demo` first (trains and exports the default)"
        )
    paths = variants(ckpt, fp32, "tiny", "builtin", 32, args.modes)
    summaries = accuracy(paths, parity.Reference(ckpt), metrics.builtin_cases(args.tiny_cases), 4)
    return {"accuracy": without_rows(summaries)}


def print_tables(report: dict) -> None:
    if "smollm2" in report:
        r = report["smollm2"]
        speed = r.get("speed")  # absent with --skip-speed
        base = speed["fp32"]["decode_tokens_per_s"]["median"] if speed else None
        fused = speed.get("fused fp32", speed["fp32"])["decode_tokens_per_s"]["median"] if speed else None
        fp32 = r["accuracy"]["fp32"]
        print("\n### nanoVLM-222M shape, real SmolLM2-135M decoder (vs fp32 PyTorch)\n")
        print(
            "| mode | KL (nats/token) | top-1 agree | greedy exact | common prefix | vision cosine min | size (MB) | size vs fp32 | decoder vs fp32 | decode tok/s | vs fp32 ORT | vs fused fp32 ORT |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for mode, a in r["accuracy"].items():
            d = speed[mode]["decode_tokens_per_s"]["median"] if speed else None
            rates = f"{d:.1f} | {d / base:.2f}x | {d / fused:.2f}x" if speed else "- | - | -"
            print(
                f"| {mode} | {a['kl_mean']:.4f} | {a['top1_agreement']:.3f} | {a['exact_match']:.2f} | "
                f"{a['common_prefix_ratio']:.2f} | {a.get('vision_cosine_min', float('nan')):.4f} | "
                f"{a['bytes'] / 1e6:.1f} | {a['bytes'] / fp32['bytes']:.0%} | "
                f"{a['decoder_bytes'] / fp32['decoder_bytes']:.1%} | {rates} |"
            )
        for name, s in r.get("llama_cpp", {}).items():
            if name == "skipped":
                print(f"\nllama.cpp: {s}")
                continue
            d = s["decode_tokens_per_s"]["median"]
            print(
                f"| {name} (LM only) | - | - | - | - | - | {s['bytes'] / 1e6:.1f} | - | - | {d:.1f} | {d / base:.2f}x | {d / fused:.2f}x |"
            )
    if "smollm2" in report and "text_only" in report["smollm2"]:
        print("\n### the same, text prompts only (teacher-forced KL vs fp32 PyTorch, base vocabulary)\n")
        print("| mode | KL (nats/token) | top-1 agree |\n| --- | --- | --- |")
        for mode, a in report["smollm2"]["text_only"].items():
            print(f"| {mode} | {a['kl_mean']:.4f} | {a['top1_agreement']:.3f} |")
    if "smollm2" in report and "check_set" in report["smollm2"]:
        print("\n### the same bundles on a check set no recipe was chosen on (KL vs fp32 PyTorch)\n")
        print("| mode | KL (nats/token) | top-1 agree |\n| --- | --- | --- |")
        for mode, a in report["smollm2"]["check_set"].items():
            print(f"| {mode} | {a['kl_mean']:.4f} | {a['top1_agreement']:.3f} |")
    if "tiny" in report:
        print("\n### trained tiny default, built-in test split (vs fp32 PyTorch)\n")
        print(
            "| mode | task accuracy | fp32 PyTorch accuracy | KL | top-1 agree | greedy exact | size (MB) |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for mode, a in report["tiny"]["accuracy"].items():
            print(
                f"| {mode} | {a['task_accuracy']:.3f} | {a['reference_task_accuracy']:.3f} | {a['kl_mean']:.5f} | "
                f"{a['top1_agreement']:.3f} | {a['exact_match']:.3f} | {a['bytes'] / 1e6:.2f} |"
            )


def main() -> None:
    from evaluation.bench import machine

    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="smollm2,tiny")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tiny-cases", type=int, default=600)
    ap.add_argument("--json", default=None)
    ap.add_argument(
        "--modes",
        type=lambda v: v.split(","),
        default=None,
        help="comma-separated labels (e.g. int8-static,fused int4); default: every mode",
    )
    ap.add_argument("--skip-speed", action="store_true", help="accuracy and size only")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    report = {
        "machine": machine(),
        "new_tokens": args.max_new_tokens,
        "repeats": args.repeats,
    }
    models = args.models.split(",")
    if "tiny" in models:
        report["tiny"] = tiny(args)
    if "smollm2" in models:
        report["smollm2"] = smollm2(args)
    print_tables(report)
    if args.json:
        from core.files import atomic_write

        with atomic_write(args.json) as f:
            json.dump(
                report, f, indent=2, default=lambda o: o.tolist() if isinstance(o, np.ndarray) else str(o)
            )


if __name__ == "__main__":
    main()
