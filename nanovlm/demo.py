"""`nanovlm demo`: the whole PyTorch side in one command, on the embedded default.

Trains the tiny model on the built-in shapes data (or reuses a finished run), scores it on the
test split next to the blind (question-only) baseline, and answers a few questions.
"""

from __future__ import annotations

import json
import logging
import os
import time

import click

from .collator import Collator
from .shapes_dataset import ShapesDataset, split_blind_baseline
from .train import answer, evaluate, train
from .train_config import TrainConfig
from .vision_language_model import VisionLanguageModel

log = logging.getLogger(__name__)


def finished_run(tc: TrainConfig) -> bool:
    path = os.path.join(tc.output_dir, "summary.json")
    if not os.path.exists(path) or not os.path.exists(
        os.path.join(tc.output_dir, "checkpoint", "model.safetensors")
    ):
        return False
    with open(path) as f:
        return json.load(f).get("steps") == tc.max_training_steps


def run_demo(output_dir: str, retrain: bool = False, test_samples: int = 600) -> dict:
    tc = TrainConfig(output_dir=output_dir)
    t0 = time.time()
    if retrain or not finished_run(tc):
        click.echo(f"Training the default tiny model on the built-in shapes data -> {output_dir}")
        train(tc)
    else:
        click.echo(f"Reusing the finished model in {output_dir} (--retrain to train again)")
    with open(os.path.join(output_dir, "summary.json")) as f:
        summary = json.load(f)
    model = VisionLanguageModel.from_pretrained(os.path.join(output_dir, "checkpoint"))
    collator = Collator(model.cfg, model.tokenizer, tc.max_sample_length)
    test = evaluate(model, tc, collator, split="test", n=test_samples)
    blind = split_blind_baseline("test", test_samples, tc.seed)

    click.echo("\nA few test questions (PyTorch, greedy):")
    ds = ShapesDataset("test", seed=tc.seed, image_size=tc.shapes_image_size)
    samples = [ds[i] for i in range(6)]
    got = answer(model, model.tokenizer, collator.image_processor, [[s.image] for s in samples],
                 [s.question for s in samples])  # fmt: skip
    for s, a in zip(samples, got, strict=True):
        click.echo(f"  Q: {s.question:<52} A: {a:<8} (expected {s.answer})")

    click.echo("\nExporting to ONNX and answering the same test questions with the torch-free runtime ...")
    runtime_result = runtime_parity(os.path.join(output_dir, "checkpoint"), os.path.join(output_dir, "bundle"),
                                    model, collator, tc, test_samples)  # fmt: skip

    result = {
        "params": sum(p.numel() for p in model.parameters()),
        "train_steps": summary["steps"],
        "train_seconds": round(summary.get("train_seconds", 0.0), 1),
        "test_accuracy": test["accuracy"],
        "test_accuracy_by_type": test["accuracy_by_type"],
        "blind_baseline": blind,
        **runtime_result,
        "demo_seconds": round(time.time() - t0, 1),
    }
    click.echo("\n| metric | value |\n| --- | --- |")
    click.echo(f"| parameters | {result['params']:,} |")
    click.echo(f"| training | {result['train_steps']} steps, {result['train_seconds']} s |")
    click.echo(f"| test exact match ({test_samples} questions) | {100 * test['accuracy']:.1f}% |")
    for q, acc in test["accuracy_by_type"].items():
        click.echo(f"| &nbsp; {q} | {100 * acc:.1f}% |")
    click.echo(f"| blind baseline (question only) | {100 * blind:.1f}% |")
    click.echo(f"| runtime (ONNX Runtime) exact match | {100 * result['runtime_accuracy']:.1f}% |")
    click.echo(f"| runtime answers identical to PyTorch | {result['runtime_identical']}/{test_samples} |")
    click.echo(
        f"| runtime / PyTorch answering time | {result['runtime_s']:.1f} s / {result['pytorch_s']:.1f} s |"
    )
    click.echo(f"\nCurves: {os.path.join(output_dir, 'training_curves.png')}")
    with open(os.path.join(output_dir, "demo.json"), "w") as f:
        json.dump(result, f, indent=2)
    return result


def runtime_parity(ckpt: str, bundle: str, model: VisionLanguageModel, collator: Collator, tc: TrainConfig,
                   n: int) -> dict:  # fmt: skip
    """Export the checkpoint and answer n test questions with both PyTorch and the runtime."""
    from export.onnx_export import export_onnx
    from runtime.pipeline import VLMPipeline

    export_onnx(ckpt, bundle)
    pipe = VLMPipeline.from_bundle(bundle)
    ds = ShapesDataset("test", seed=tc.seed, image_size=tc.shapes_image_size)
    samples = [ds[i] for i in range(n)]
    torch_answers, rt_answers = [], []
    t_torch = t_rt = 0.0
    for i in range(0, n, 48):
        chunk = samples[i : i + 48]
        t = time.perf_counter()
        torch_answers += answer(model, model.tokenizer, collator.image_processor, [[s.image] for s in chunk],
                                [s.question for s in chunk], max_new_tokens=8)  # fmt: skip
        t_torch += time.perf_counter() - t
        t = time.perf_counter()
        rt_answers += pipe.generate_batch([([s.image], s.question) for s in chunk], max_new_tokens=8)
        t_rt += time.perf_counter() - t
    return {
        "runtime_accuracy": sum(a.strip() == s.answer for a, s in zip(rt_answers, samples, strict=True)) / n,
        "runtime_identical": sum(a == b for a, b in zip(rt_answers, torch_answers, strict=True)),
        "runtime_s": t_rt,
        "pytorch_s": t_torch,
    }
