"""The options and error handling every command shares."""

from __future__ import annotations

import functools
import importlib.util
import logging
from collections.abc import Callable
from typing import Any

import click

from core.install import install_hint

log = logging.getLogger(__name__)

EXPECTED_ERRORS = (ValueError, FileNotFoundError, RuntimeError, OSError)


def user_errors(fn: Callable) -> Callable:
    """Expected errors -> one line on stderr and exit 1 (the traceback only with -v)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except EXPECTED_ERRORS as e:
            if log.isEnabledFor(logging.DEBUG):
                raise
            raise click.ClickException(str(e) or type(e).__name__) from None

    return wrapper


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def needs_torch(command: str) -> None:
    """A clear line instead of `No module named 'torch'` on a torch-free install."""
    missing = [m for m in ("torch", "safetensors") if not installed(m)]
    if missing:
        raise click.ClickException(
            f"`{command}` needs the PyTorch reference ({', '.join(missing)} not installed): "
            f"{install_hint('torch')} (on a CPU-only machine install torch==2.13.0 first)"
        )


def pipeline_options(command: Callable) -> Callable:
    """--backend/--provider: how a command runs a bundle."""
    command = click.option(
        "--provider",
        type=click.Choice(["cpu", "cuda", "tensorrt"]),
        default="cpu",
        show_default=True,
        help="ONNX Runtime execution provider (--backend ort).",
    )(command)
    return click.option(
        "--backend",
        type=click.Choice(["ort", "trt"]),
        default="ort",
        show_default=True,
        help="ort: ONNX Runtime; trt: the TensorRT engines `nanovlm-export trt` added to the bundle.",
    )(command)


def image_tiles_option(what: str) -> Callable:
    """--image-tiles: the resolution budget, in tiles along an image's long edge."""
    return click.option(
        "--image-tiles",
        type=click.IntRange(1, 8),
        default=None,
        help="Resolution budget: tiles along an image's long edge (SmolVLM: longest_edge = N x 512, "
        f"splitting above 1; nanoVLM: max_img_size = N x tile; 1: one view). {what}",
    )


def overwrite_option(command: Callable) -> Callable:
    return click.option(
        "--overwrite",
        is_flag=True,
        help="Replace OUT when it holds this command's earlier output (anything else is refused).",
    )(command)


def sampling_options(command: Callable) -> Callable:
    """The generation options of `run` and `generate`: the same names, defaults and meaning."""
    for option in reversed(
        [
            click.option(
                "--max-new-tokens",
                type=click.IntRange(1, 1_000_000),
                default=64,
                show_default=True,
                help="Most tokens the answer may have (it ends earlier at EOS).",
            ),
            click.option(
                "--temperature",
                type=click.FloatRange(0),
                default=0.0,
                show_default=True,
                help="0 means greedy. Applied before top-k and top-p.",
            ),
            click.option(
                "--top-k", type=click.IntRange(0), default=0, show_default=True, help="0 means off."
            ),
            click.option(
                "--top-p",
                type=click.FloatRange(0, 1, min_open=True),
                default=1.0,
                show_default=True,
                help="1 means off.",
            ),
            click.option(
                "--repetition-penalty",
                type=click.FloatRange(0, min_open=True),
                default=1.0,
                show_default=True,
                help="1 means off.",
            ),
            click.option(
                "--seed", type=int, default=None, help="Random seed of sampling (with --temperature > 0)."
            ),
        ]
    ):
        command = option(command)
    return command


def sampling_config(kw: dict[str, Any]) -> Any:
    from core.sampling import SamplingConfig

    return SamplingConfig(
        **{k: kw.pop(k) for k in ("temperature", "top_k", "top_p", "repetition_penalty", "seed")}
    )
