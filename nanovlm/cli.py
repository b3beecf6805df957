"""`nanovlm` command line: train, generate (and later run, demo). Heavy modules load lazily."""

from __future__ import annotations

import logging

import click


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool) -> None:
    """nanoVLM toolkit: the PyTorch reference side."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )


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
