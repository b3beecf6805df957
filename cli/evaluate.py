"""`nanovlm-export validate` and `bench`: a bundle against PyTorch, for answers and for speed."""

from __future__ import annotations

import os

import click

from core.install import install_hint

from .options import installed, needs_torch, pipeline_options, user_errors


def _thresholds(items: tuple[str, ...]) -> dict[str, float]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        try:
            out[key] = float(value)
        except ValueError:
            raise click.BadParameter(f"{item!r} is not KEY=NUMBER", param_hint="--threshold") from None
        if not sep:
            raise click.BadParameter(f"{item!r} is not KEY=NUMBER", param_hint="--threshold")
    return out


@click.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--reference",
    help="The PyTorch checkpoint the bundle came from (directory or Hub id). "
    "Without it: the PyTorch results stored in the bundle at export (no torch needed).",
)
@click.option(
    "--images",
    default="builtin",
    show_default=True,
    help="With --reference: 'builtin' (test split) or a folder of images.",
)
@click.option(
    "--prompts", type=click.Path(exists=True, dir_okay=False), help="One prompt per line, for --images DIR."
)
@click.option(
    "--samples",
    type=click.IntRange(1, 100_000),
    default=24,
    show_default=True,
    help="With --reference: cases to compare.",
)
@click.option(
    "--max-new-tokens",
    type=click.IntRange(1, 100_000),
    default=None,
    help="Greedy tokens per case [16; the stored reference's own count without --reference].",
)
@pipeline_options
@click.option(
    "--threshold", "thresholds", multiple=True, help="Override a gate, e.g. kl_mean_max=0.02 (repeatable)."
)
@click.option(
    "--json", "json_out", type=click.Path(dir_okay=False), help="Write the full report (per case) here."
)
@user_errors
def validate(
    bundle: str,
    reference: str | None,
    images: str,
    prompts: str | None,
    samples: int,
    max_new_tokens: int | None,
    backend: str,
    provider: str,
    thresholds: tuple[str, ...],
    json_out: str | None,
) -> None:
    """Compare BUNDLE with PyTorch (its checkpoint, or the results stored in it); exit 1 when a gate fails."""
    from core.recipes import gates_for
    from evaluation import metrics
    from runtime.pipeline import VLMPipeline

    pipe = VLMPipeline.from_bundle(bundle, provider=provider, backend=backend)
    limits = gates_for(pipe.bundle.mode, _thresholds(thresholds))
    if reference:
        needs_torch("validate --reference")
        from evaluation import parity

        ref: metrics.Reference = parity.Reference(reference)
        cases = (
            metrics.builtin_cases(samples)
            if images == "builtin"
            else metrics.folder_cases(images, samples, prompts)
        )
        max_new_tokens = max_new_tokens or 16
    else:
        if images != "builtin":
            raise click.BadParameter("--images DIR needs --reference CHECKPOINT", param_hint="--images")
        stored = metrics.StoredReference(pipe.bundle)
        ref, cases, max_new_tokens = stored, stored.cases, max_new_tokens or stored.max_new_tokens
    near_tie = metrics.tie_margin(limits["kl_mean_max"])
    summary = metrics.compare(pipe, ref, cases, max_new_tokens, near_tie=near_tie)
    failures = metrics.gate(summary, limits)
    click.echo(metrics.table(summary, limits))
    note = metrics.ties_note(summary)
    if note:
        click.echo(note)
    if json_out:
        from core.files import write_json

        write_json(
            json_out,
            {
                "bundle": bundle,
                "reference": reference or "stored",
                "thresholds": limits,
                "failures": failures,
                "summary": summary,
            },
        )
    if failures:
        click.echo("FAILED: " + "; ".join(failures), err=True)
        raise SystemExit(1)
    click.echo("passed")


@click.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--reference", help="PyTorch checkpoint to measure alongside (with and without KV cache).")
@click.option(
    "--variants",
    multiple=True,
    type=click.Path(exists=True, file_okay=False),
    help="More bundles (e.g. quantized) to measure in the same run (repeatable).",
)
@click.option("--image", type=click.Path(exists=True, dir_okay=False), help="Default: a scikit-image photo.")
@click.option(
    "--prompt", default="Describe this image in detail.", show_default=True, help="The question timed."
)
@click.option(
    "--max-new-tokens",
    type=click.IntRange(2, 100_000),
    default=64,
    show_default=True,
    help="Tokens each timed answer decodes (EOS off).",
)
@click.option(
    "--repeats",
    type=click.IntRange(1, 1000),
    default=3,
    show_default=True,
    help="Timed runs per backend (median).",
)
@click.option(
    "--threads", type=click.IntRange(1, 1024), default=None, help="CPU threads (default: all cores)."
)
@click.option(
    "--growth",
    default="16,32,64",
    show_default=True,
    help="Output lengths for the PyTorch cost-growth curve ('' to skip).",
)
@click.option(
    "--plot",
    "plot_path",
    help="PNG chart (default: bench.png here, replaced only if bench wrote it; '': none; needs matplotlib).",
)
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Write the results as JSON here.")
@user_errors
def bench(
    bundle: str,
    reference: str | None,
    variants: tuple[str, ...],
    image: str | None,
    prompt: str,
    max_new_tokens: int,
    repeats: int,
    threads: int | None,
    growth: str,
    plot_path: str | None,
    json_out: str | None,
) -> None:
    """Image encode, TTFT, prefill and decode speed, peak memory and size: PyTorch and bundles."""
    if reference:
        needs_torch("bench --reference")
    if image is None and not installed("skimage"):
        raise click.ClickException("pass --image FILE (the default photograph comes with scikit-image)")
    from evaluation import bench as b

    if plot_path is None:
        plot_path = "bench.png"
        if os.path.exists(plot_path) and not b.is_bench_plot(plot_path):
            raise click.ClickException(
                f"{os.path.abspath(plot_path)} exists and bench did not write it: pass --plot PATH"
            )

    try:
        lengths = tuple(int(x) for x in growth.split(",") if x.strip())
    except ValueError:
        raise click.BadParameter(
            f"{growth!r} is not a comma-separated list of lengths", param_hint="--growth"
        ) from None
    if any(n < 2 for n in lengths):
        raise click.BadParameter(f"{growth!r}: every length must be at least 2", param_hint="--growth")
    result = b.bench([bundle, *variants], reference, image, prompt, max_new_tokens, repeats, threads, lengths)
    click.echo(b.table(result))
    if json_out:  # the results first: a chart that cannot be drawn costs nothing measured
        from core.files import write_json

        write_json(json_out, result)
    if plot_path == "":  # no chart wanted
        return
    if not installed("matplotlib"):
        click.echo(f"chart skipped: it needs matplotlib ({install_hint('jetson')})", err=True)
        return
    b.plot(result, plot_path)
    click.echo(f"chart: {plot_path}")
