"""`nanovlm train`, `demo` and `generate`: the PyTorch reference (the torch extra)."""

from __future__ import annotations

import json
from typing import Any

import click

from .options import needs_torch, sampling_config, sampling_options, user_errors


@click.command()
@click.option(
    "--config", "config_path", type=click.Path(exists=True, dir_okay=False), help="TrainConfig JSON."
)
@click.option(
    "-o", "--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a TrainConfig field."
)
@click.option("--resume", is_flag=True, help="Continue from OUTPUT_DIR/checkpoint.")
@click.option("--overwrite", is_flag=True, help="Start afresh over an earlier run in OUTPUT_DIR.")
@user_errors
def train(config_path: str | None, overrides: tuple[str, ...], resume: bool, overwrite: bool) -> None:
    """Train (default: the tiny model on the built-in shapes data). Works under torchrun for DDP."""
    needs_torch("train")
    from nanovlm.train import train as run
    from nanovlm.train_config import TrainConfig

    tc = TrainConfig.load(config_path) if config_path else TrainConfig()
    flags = (["resume=true"] if resume else []) + (["overwrite=true"] if overwrite else [])
    tc = tc.override(list(overrides) + flags)
    summary = run(tc)
    if summary:
        click.echo(json.dumps(summary, indent=2))


@click.command()
@click.option(
    "--output-dir", default="artifacts/tiny", show_default=True, help="Where the default model lives."
)
@click.option("--retrain", is_flag=True, help="Train again even if a finished model exists.")
@click.option(
    "--test-samples",
    type=click.IntRange(1),
    default=600,
    show_default=True,
    help="Built-in test questions to score.",
)
@click.option(
    "--steps", type=click.IntRange(1), default=None, help="Training steps (default: TrainConfig's)."
)
@click.option(
    "--full-schedule", is_flag=True, help="Train every step instead of stopping at the validation target."
)
@user_errors
def demo(output_dir: str, retrain: bool, test_samples: int, steps: int | None, full_schedule: bool) -> None:
    """Train the tiny default (or reuse it), export, quantize to INT8, validate, answer, measure."""
    needs_torch("demo")
    from cli.demo import run_demo

    run_demo(output_dir, retrain, test_samples, steps, full_schedule)


@click.command()
@click.argument("checkpoint")
@click.option("--image", "images", multiple=True, help="Image file (repeat for several; none: text only).")
@click.option("--prompt", required=True, help="The question (about the images, if any).")
@sampling_options
@click.option("--revision", default=None, help="Hub revision when CHECKPOINT is a Hub id.")
@user_errors
def generate(
    checkpoint: str,
    images: tuple[str, ...],
    prompt: str,
    max_new_tokens: int,
    revision: str | None,
    **kw: Any,
) -> None:
    """Answer PROMPT (about --image, if given) with the PyTorch model at CHECKPOINT (a directory or Hub id)."""
    needs_torch("generate")
    import torch

    from core.processors import ImageProcessor, prepare_batch
    from nanovlm.vision_language_model import VisionLanguageModel

    sampling = sampling_config(kw)
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
        torch.from_numpy(batch.pixel_values) if images else None,
        attention_mask=torch.from_numpy(batch.attention_mask),
        max_new_tokens=max_new_tokens,
        sampling=sampling,
    )
    click.echo(model.tokenizer.decode(out[0].tolist()))
