"""`nanovlm` command line: train, demo, generate, run. Heavy modules load lazily."""

from __future__ import annotations

import json
import logging
from typing import Any

import click


def pipeline_options(command: Any) -> Any:
    """--backend/--provider: how a command runs a bundle (`nanovlm run`, `nanovlm-export validate`)."""
    command = click.option(
        "--provider", type=click.Choice(["cpu", "cuda", "tensorrt"]), default="cpu", show_default=True,
        help="ONNX Runtime execution provider (--backend ort).",
    )(command)  # fmt: skip
    return click.option(
        "--backend", type=click.Choice(["ort", "trt"]), default="ort", show_default=True,
        help="ort: ONNX Runtime; trt: the TensorRT engines `nanovlm-export trt` added to the bundle.",
    )(command)  # fmt: skip


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool) -> None:
    """nanoVLM toolkit: the PyTorch reference side."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )


@main.command()
@click.option(
    "--config", "config_path", type=click.Path(exists=True, dir_okay=False), help="TrainConfig JSON."
)
@click.option(
    "-o", "--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a TrainConfig field."
)
@click.option("--resume", is_flag=True, help="Continue from OUTPUT_DIR/checkpoint.")
def train(config_path: str | None, overrides: tuple[str, ...], resume: bool) -> None:
    """Train (default: the tiny model on the built-in shapes data). Works under torchrun for DDP."""
    from .train import train as run
    from .train_config import TrainConfig

    try:
        tc = TrainConfig.load(config_path) if config_path else TrainConfig()
        tc = tc.override(list(overrides) + (["resume=true"] if resume else []))
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    summary = run(tc)
    if summary:
        click.echo(json.dumps(summary, indent=2))


@main.command()
@click.option(
    "--output-dir", default="artifacts/tiny", show_default=True, help="Where the default model lives."
)
@click.option("--retrain", is_flag=True, help="Train again even if a finished model exists.")
@click.option("--test-samples", default=600, show_default=True, help="Built-in test questions to score.")
@click.option("--steps", type=int, default=None, help="Training steps (default: the TrainConfig default).")
def demo(output_dir: str, retrain: bool, test_samples: int, steps: int | None) -> None:
    """Train the tiny default (or reuse it), export, quantize to INT8, validate, answer, measure."""
    from .demo import run_demo

    run_demo(output_dir, retrain, test_samples, steps)


@main.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--image", "images", multiple=True, required=True, help="Image file (repeat for several).")
@click.option("--prompt", required=True)
@pipeline_options
@click.option("--stream", is_flag=True, help="Print text as tokens arrive.")
@click.option("--max-new-tokens", default=64, show_default=True)
@click.option("--temperature", default=0.0, show_default=True, help="0 means greedy.")
@click.option("--top-k", default=0, show_default=True)
@click.option("--top-p", default=1.0, show_default=True)
@click.option("--repetition-penalty", default=1.0, show_default=True)
@click.option("--seed", type=int, default=None)
@click.option("--json", "as_json", is_flag=True, help="Print the answer with timings as JSON.")
def run(bundle: str, images: tuple[str, ...], prompt: str, provider: str, backend: str, stream: bool, max_new_tokens: int,
        temperature: float, top_k: int, top_p: float, repetition_penalty: float, seed: int | None,
        as_json: bool) -> None:  # fmt: skip
    """Answer PROMPT about --image with an exported BUNDLE on ONNX Runtime or TensorRT (no torch needed)."""
    from runtime.bundle import BundleError
    from runtime.pipeline import VLMPipeline

    sampling = dict(
        temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty, seed=seed
    )
    try:
        pipe = VLMPipeline.from_bundle(bundle, provider=provider, backend=backend)
        if stream and not as_json:
            for piece in pipe.stream(list(images), prompt, max_new_tokens, **sampling):
                click.echo(piece, nl=False)
            click.echo()
            return
        answer = pipe.generate(list(images), prompt, max_new_tokens, **sampling)
    except (BundleError, ValueError, FileNotFoundError, RuntimeError) as e:
        raise click.ClickException(str(e)) from None
    if as_json:
        click.echo(json.dumps({"answer": answer, "timings": pipe.last_timings.as_dict()}, indent=2))
    else:
        click.echo(answer)


@main.command()
@click.argument("checkpoint")
@click.option("--image", "images", multiple=True, required=True, help="Image file (repeat for several).")
@click.option("--prompt", required=True, help="Question about the image(s).")
@click.option("--max-new-tokens", default=64, show_default=True)
@click.option("--temperature", default=0.0, show_default=True, help="0 means greedy.")
@click.option("--top-k", default=50, show_default=True)
@click.option("--top-p", default=0.9, show_default=True)
@click.option("--seed", type=int, default=None)
@click.option("--revision", default=None, help="Hub revision when CHECKPOINT is a Hub id.")
def generate(
    checkpoint: str,
    images: tuple[str, ...],
    prompt: str,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    seed: int | None,
    revision: str | None,
) -> None:
    """Answer PROMPT about --image with the PyTorch model at CHECKPOINT (a directory or Hub id)."""
    import torch

    from .processors import ImageProcessor, prepare_batch
    from .vision_language_model import VisionLanguageModel

    model = VisionLanguageModel.from_pretrained(checkpoint, revision=revision)
    if model.tokenizer is None:
        raise click.ClickException(
            f"{checkpoint} has no tokenizer files and cfg.lm_tokenizer could not be loaded"
        )
    batch = prepare_batch(
        model.cfg, model.tokenizer, ImageProcessor.from_config(model.cfg), [list(images)], [prompt]
    )
    out = model.generate(
        torch.from_numpy(batch.input_ids),
        torch.from_numpy(batch.pixel_values),
        attention_mask=torch.from_numpy(batch.attention_mask),
        max_new_tokens=max_new_tokens,
        greedy=temperature <= 0,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
    )
    click.echo(model.tokenizer.decode(out[0].tolist()))


if __name__ == "__main__":
    main()
