"""What each kind of bundle is: one row per precision or quantization mode.

Every list of modes in the toolkit comes from this table: the `quantize --mode` choices, the
validate gates, which modes the fused CPU decoder takes, what needs calibration, and the
benchmark lists. docs/quantization.md has the measurements behind each recipe's settings.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Gates:
    """`validate` bars: each compares one parity metric with a limit."""

    vision_cosine_min: float  # lowest per-token cosine of image embeddings vs PyTorch
    kl_mean_max: float  # mean KL(PyTorch || bundle) over teacher-forced steps, nats per token
    top1_min: float  # share of decisive steps (no near tie in PyTorch) whose top-1 agrees with PyTorch
    exact_match_min: (
        float  # share of whole greedy answers equal to PyTorch's (those not parting at a near tie)
    )

    def as_dict(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in GATE_METRICS}


# gate name -> (summary metric, "min" or "max")
GATE_METRICS = {
    "vision_cosine_min": ("vision_cosine_min", "min"),
    "kl_mean_max": ("kl_mean", "max"),
    "top1_min": ("top1_decisive", "min"),
    "exact_match_min": ("exact_match_decisive", "min"),
}


@dataclass(frozen=True)
class Recipe:
    name: str
    summary: str
    scheme: (
        str  # "float": no integer weights; "weight-only": MatMulNBits (+ per_token_int8); "qdq": Q/DQ int8
    )
    gates: Gates
    quantize_mode: bool = True  # a `quantize --mode` choice (fp32 is the export's own precision)
    weight_bits: int | None = None  # decoder weight bits (None: float weights)
    fp16: bool = False  # fp16 weights and matrix products
    calibrated: bool = False  # records real graph inputs before quantizing
    decode_steps: int = 0  # greedy decode steps recorded per calibration sample, after its prefill
    fused_decoder: bool = False  # applies to bundles with the fused CPU decoder graph
    # the vision encoder through DynamicQuantizeMatMul (CPU kernels; ~2x 8-bit MatMulNBits over
    # an image's tokens) rather than 8-bit MatMulNBits
    vision_dynamic_int8: bool = False
    # decoder MatMuls (name globs) run as per-token W8A8 (calibration/per_token_int8.py) after
    # SmoothQuant at `smooth_alpha`: integer GEMMs that stay fast at a prefill's and a batch's rows
    per_token_int8: tuple[str, ...] = ()
    smooth_alpha: float | None = None
    # per-token MatMuls (name globs) whose input is rotated by Hadamard blocks at run time, the
    # inverse folded into their weights (calibration/per_token_int8.py)
    hadamard: tuple[str, ...] = ()
    runs_on: tuple[str, ...] = ("onnxruntime",)


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe(
            "fp32",
            "the exported graphs as they are",
            "float",
            Gates(vision_cosine_min=0.9999, kl_mean_max=1e-4, top1_min=0.99, exact_match_min=0.95),
            quantize_mode=False,
            fused_decoder=True,
            runs_on=("onnxruntime", "tensorrt"),
        ),
        Recipe(
            "fp16",
            "fp16 weights and products; norms, softmax and RoPE in fp32; fp32 graph IO",
            "float",
            Gates(vision_cosine_min=0.999, kl_mean_max=1e-3, top1_min=0.97, exact_match_min=0.8),
            fp16=True,
            runs_on=("onnxruntime", "tensorrt"),
        ),
        Recipe(
            "int8-dynamic",
            "8-bit MatMulNBits weights in blocks of 32, int8 activations at run time; the vision "
            "encoder in dynamic int8",
            "weight-only",
            Gates(vision_cosine_min=0.99, kl_mean_max=0.01, top1_min=0.93, exact_match_min=0.6),
            weight_bits=8,
            fused_decoder=True,
            vision_dynamic_int8=True,
        ),
        Recipe(
            "int8-w8a8",
            "int8-dynamic with q/k/v and gate/up as per-token int8 activations x int8 weights after "
            "SmoothQuant: fast prefill and batches on CPUs",
            "weight-only",
            Gates(vision_cosine_min=0.99, kl_mean_max=0.01, top1_min=0.93, exact_match_min=0.6),
            weight_bits=8,
            calibrated=True,
            decode_steps=4,
            fused_decoder=True,
            vision_dynamic_int8=True,
            per_token_int8=("*/q_proj/*", "*/k_proj/*", "*/v_proj/*", "*/gate_proj/*", "*/up_proj/*"),
            smooth_alpha=0.65,
        ),
        Recipe(
            "int8-w8a8-rotated",
            "every decoder MatMul as per-token int8 activations x int8 weights, each input smoothed "
            "(SmoothQuant) and rotated by Hadamard blocks: int8's lowest KL and fastest prefill; one "
            "stream decodes ~20% slower than int8-w8a8",
            "weight-only",
            Gates(vision_cosine_min=0.99, kl_mean_max=0.01, top1_min=0.93, exact_match_min=0.6),
            weight_bits=8,
            calibrated=True,
            decode_steps=4,
            fused_decoder=True,
            vision_dynamic_int8=True,
            per_token_int8=(
                "*/q_proj/*",
                "*/k_proj/*",
                "*/v_proj/*",
                "*/out_proj/*",
                "*/gate_proj/*",
                "*/up_proj/*",
                "*/down_proj/*",
            ),
            smooth_alpha=0.65,
            hadamard=("*",),
        ),
        Recipe(
            "int8-static",
            "Q/DQ int8 on an fp16 base: int8 weights throughout, calibrated int8 activations where they "
            "hold: the TensorRT INT8 input",
            "qdq",
            Gates(vision_cosine_min=0.98, kl_mean_max=0.01, top1_min=0.93, exact_match_min=0.6),
            weight_bits=8,
            fp16=True,
            calibrated=True,
            decode_steps=4,
            runs_on=("onnxruntime", "tensorrt"),
        ),
        Recipe(
            "int4",
            "4-bit MatMulNBits decoder weights rounded by GPTQ, sensitive layers at 8 bits",
            "weight-only",
            Gates(vision_cosine_min=0.99, kl_mean_max=0.05, top1_min=0.85, exact_match_min=0.4),
            weight_bits=4,
            calibrated=True,
            decode_steps=16,
            fused_decoder=True,
            vision_dynamic_int8=True,
        ),
        Recipe(
            "int4-fp16",
            "int4 on an fp16 graph, for GPUs",
            "weight-only",
            Gates(vision_cosine_min=0.99, kl_mean_max=0.05, top1_min=0.85, exact_match_min=0.4),
            weight_bits=4,
            fp16=True,
            calibrated=True,
            decode_steps=16,
        ),
    )
}

QUANTIZE_MODES = tuple(name for name, r in RECIPES.items() if r.quantize_mode)
FUSED_MODES = tuple(name for name in QUANTIZE_MODES if RECIPES[name].fused_decoder)
CALIBRATED_MODES = tuple(name for name in QUANTIZE_MODES if RECIPES[name].calibrated)


def recipe(name: str) -> Recipe:
    """The recipe of a mode or precision, with a clear error for an unknown name."""
    if name not in RECIPES:
        raise ValueError(f"unknown mode {name!r}; expected one of {', '.join(RECIPES)}")
    return RECIPES[name]


def gates_for(name: str, overrides: dict[str, float] | None = None) -> dict[str, float]:
    """The validate gates of a recipe, with any overridden by name."""
    out = recipe(name).gates.as_dict()
    for key, value in (overrides or {}).items():
        if key not in GATE_METRICS:
            raise ValueError(f"unknown threshold {key!r}; known: {', '.join(GATE_METRICS)}")
        out[key] = value
    return out
