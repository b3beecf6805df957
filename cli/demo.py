"""`nanovlm demo`: the whole PyTorch side in one command, on the embedded default.

Trains the tiny model on the built-in shapes data (or reuses a finished run), scores it on the
test split next to the blind (question-only) baseline, exports it to ONNX, quantizes it to INT8
(on the standard graph, and on the fused CPU decoder graph), validates every bundle against
PyTorch, answers a few questions with every backend, and measures speed: one final table.
"""

from __future__ import annotations

import json
import logging
import os
import time

import click

from core.files import atomic_write, check_target
from core.processors import ImageProcessor
from core.shapes_dataset import ShapesDataset, split_blind_baseline
from nanovlm.collator import Collator
from nanovlm.train import answer, evaluate, is_training_run, train
from nanovlm.train_config import TrainConfig
from nanovlm.vision_language_model import VisionLanguageModel

log = logging.getLogger(__name__)


# The demo stops training once validation accuracy reaches this (checked every EVAL_INTERVAL
# steps); --full-schedule trains all TrainConfig.max_training_steps.
TARGET_ACCURACY = 0.99
EVAL_INTERVAL = 250


def finished_run(tc: TrainConfig) -> bool:
    """Whether output_dir holds a run with these settings that ran to its end (or its target)."""
    files = [os.path.join(tc.output_dir, f) for f in ("summary.json", "train_config.json")]
    if not all(map(os.path.exists, files)) or not os.path.exists(
        os.path.join(tc.output_dir, "checkpoint", "model.safetensors")
    ):
        return False
    with open(files[0]) as f:
        summary = json.load(f)
    saved = TrainConfig.load(files[1])
    same = all(
        getattr(saved, k) == getattr(tc, k)
        for k in ("max_training_steps", "target_accuracy", "eval_interval")
    )
    return same and (summary.get("steps") == tc.max_training_steps or "stopped_early" in summary)


def run_demo(
    output_dir: str,
    retrain: bool = False,
    test_samples: int = 600,
    steps: int | None = None,
    full_schedule: bool = False,
) -> dict:
    """The demo's output directory is its own: an earlier demo or training run there is reused or
    replaced; a directory holding anything else is refused."""
    check_target(output_dir, is_training_run, "training run", overwrite=True)
    tc = TrainConfig(
        output_dir=output_dir,
        overwrite=True,
        eval_interval=EVAL_INTERVAL,
        target_accuracy=0.0 if full_schedule else TARGET_ACCURACY,
    )
    if steps:
        tc.max_training_steps = steps
    t0 = time.time()
    if retrain or not finished_run(tc):
        click.echo(f"Training the default tiny model on the built-in shapes data -> {output_dir}")
        if tc.target_accuracy:
            click.echo(
                f"(stops once validation accuracy reaches {tc.target_accuracy:.0%}; --full-schedule "
                f"trains all {tc.max_training_steps} steps)"
            )
        train(tc)
    else:
        click.echo(f"Reusing the finished model in {output_dir} (--retrain to train again)")
    with open(os.path.join(output_dir, "summary.json")) as f:
        summary = json.load(f)
    if "stopped_early" in summary:
        click.echo(
            f"Training stopped at step {summary['stopped_early']['step']}: {summary['stopped_early']['reason']}"
        )
    model = VisionLanguageModel.from_pretrained(os.path.join(output_dir, "checkpoint"))
    collator = Collator(model.cfg, model.tokenizer, tc.max_sample_length)
    test = evaluate(model, tc, collator, split="test", n=test_samples)
    blind = split_blind_baseline("test", test_samples, tc.seed)

    ckpt = os.path.join(output_dir, "checkpoint")
    click.echo("\nExporting to ONNX, quantizing to INT8, and checking every bundle against PyTorch ...")
    bundles = export_and_quantize(ckpt, output_dir)
    checks = validate_bundles(ckpt, bundles, test_samples)
    show_answers(model, collator.image_processor, bundles, tc)
    click.echo("\nMeasuring speed (each backend in a fresh process) ...")
    from evaluation.bench import bench

    speed = bench(list(bundles.values()), ckpt, None, "How many objects are there?", 32, 3, None, ())
    rows = {r["name"]: r for r in speed["rows"]}

    result = {
        "params": sum(p.numel() for p in model.parameters()),
        "train_steps": summary["steps"],
        "stopped_early": summary.get("stopped_early"),
        "train_seconds": round(summary.get("train_seconds", 0.0), 1),
        "test_accuracy": test["accuracy"],
        "test_accuracy_by_type": test["accuracy_by_type"],
        "blind_baseline": blind,
        "bundles": {
            name: checks[name]
            | {k: rows[os.path.basename(path)][k] for k in ("bytes", "decode_tokens_per_s", "ttft_s")}
            for name, path in bundles.items()
        },
        "pytorch": {k: rows["pytorch"][k] for k in ("bytes", "decode_tokens_per_s", "ttft_s")},
        "demo_seconds": round(time.time() - t0, 1),
    }
    click.echo("\n| metric | value |\n| --- | --- |")
    click.echo(f"| parameters | {result['params']:,} |")
    stop = " (stopped early: validation target reached)" if result["stopped_early"] else ""
    click.echo(f"| training | {result['train_steps']} steps{stop}, {result['train_seconds']} s |")
    click.echo(f"| test exact match, PyTorch ({test_samples} questions) | {100 * test['accuracy']:.1f}% |")
    for q, acc in test["accuracy_by_type"].items():
        click.echo(f"| &nbsp; {q} | {100 * acc:.1f}% |")
    click.echo(f"| blind baseline (question only) | {100 * blind:.1f}% |")
    click.echo(
        "\n| backend | test accuracy | answers = PyTorch | KL vs PyTorch | top-1 agree | gates | size (MB) | decode tok/s | TTFT (ms) |"
    )
    click.echo("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    pt = result["pytorch"]
    click.echo(
        f"| PyTorch fp32 | {100 * test['accuracy']:.1f}% | - | - | - | - | {pt['bytes'] / 1e6:.2f} | "
        f"{pt['decode_tokens_per_s']['median']:.0f} | {1e3 * pt['ttft_s']['median']:.1f} |"
    )
    for name, b in result["bundles"].items():
        click.echo(
            f"| runtime {name} | {100 * b['task_accuracy']:.1f}% | {100 * b['exact_match']:.1f}% | "
            f"{b['kl_mean']:.2g} | {100 * b['top1_agreement']:.1f}% | {'pass' if not b['failures'] else 'FAIL'} | "
            f"{b['bytes'] / 1e6:.2f} | {b['decode_tokens_per_s']['median']:.0f} | {1e3 * b['ttft_s']['median']:.1f} |"
        )
    click.echo(
        f"\nCurves: {os.path.join(output_dir, 'training_curves.png')}; demo took {result['demo_seconds']:.0f} s"
    )
    with atomic_write(os.path.join(output_dir, "demo.json")) as f:
        json.dump(result, f, indent=2)
    return result


def export_and_quantize(ckpt: str, output_dir: str) -> dict[str, str]:
    """The fp32 bundle (standard ops: runs everywhere, TensorRT included), its INT8 variant
    (int8-dynamic: the CPU recipe, no calibration pass), and INT8 on the fused decoder graph
    (ONNX Runtime CPU only, the fastest there)."""
    from calibration.quantize import quantize_bundle
    from export.onnx_export import export_onnx

    out = {
        name: os.path.join(output_dir, d)
        for name, d in (("fp32", "bundle"), ("int8", "bundle-int8"), ("int8 fused", "bundle-int8-fused"))
    }
    fused_fp32 = os.path.join(output_dir, "bundle-fused")
    export_onnx(ckpt, out["fp32"], overwrite=True)  # the demo's own bundles: replaced on every run
    quantize_bundle(out["fp32"], out["int8"], "int8-dynamic", overwrite=True)
    export_onnx(ckpt, fused_fp32, decoder="fused", overwrite=True)
    quantize_bundle(fused_fp32, out["int8 fused"], "int8-dynamic", overwrite=True)
    return out


def validate_bundles(ckpt: str, bundles: dict[str, str], n: int) -> dict[str, dict]:
    """`nanovlm-export validate` on each bundle: n built-in test questions against PyTorch."""
    from core.recipes import gates_for
    from evaluation import metrics, parity
    from runtime.pipeline import VLMPipeline

    reference, cases = parity.Reference(ckpt), metrics.builtin_cases(n)
    out = {}
    for name, path in bundles.items():
        pipe = VLMPipeline.from_bundle(path)
        gates = gates_for(pipe.bundle.mode)
        near_tie = metrics.tie_margin(gates["kl_mean_max"])
        summary = metrics.compare(pipe, reference, cases, 4, f"validating {name}", near_tie)
        summary.pop("rows")
        summary["failures"] = metrics.gate(summary, gates)
        out[name] = summary
    return out


def show_answers(
    model: VisionLanguageModel, proc: ImageProcessor, bundles: dict[str, str], tc: TrainConfig
) -> None:
    from runtime.pipeline import VLMPipeline

    ds = ShapesDataset("test", seed=tc.seed, image_size=tc.shapes_image_size)
    samples = [ds[i] for i in range(6)]
    answers = {
        "PyTorch": answer(
            model, model.tokenizer, proc, [[s.image] for s in samples], [s.question for s in samples]
        )
    }
    for name, path in bundles.items():
        pipe = VLMPipeline.from_bundle(path)
        answers[f"runtime {name}"] = pipe.generate_batch(
            [([s.image], s.question) for s in samples], max_new_tokens=8
        )
    click.echo("\nA few test questions (greedy):")
    for i, s in enumerate(samples):
        got = "  ".join(f"{k}: {v[i]:<7}" for k, v in answers.items())
        click.echo(f"  Q: {s.question:<50} expected {s.answer:<7} {got}")
