"""What TensorRT's ONNX parser (onnx-tensorrt) accepts, per target, as data.

Source: onnx-tensorrt's operator support matrix, `docs/operators.md` at its TensorRT 10.15 release
("TensorRT 10.15 supports operators in the inclusive range of opset 9 to opset 24"), for the
operators listed here: each one's supported element types of its main ("T") tensor and the
inputs it needs as build-time constants. The older targets are that matrix minus what the
onnx-tensorrt changelog lists as added later:

    10.4   Pad with tensor `axes`; BlackmanWindow, HammingWindow, HannWindow
    10.5   STFT
    10.7   Squeeze / Unsqueeze with dynamic `axes`
    10.14  Attention (TensorRT OSS changelog: parser support for the Attention operator)
    10.15  RotaryEmbedding, RMSNormalization, TensorScatter

The changelog entries for 10.8 to 10.13 were not available when this table was written; nothing
in them is relied on (the graphs this toolkit exports use none of the operators above). An
operator missing from this table is reported as unknown, never assumed supported.
"""

from __future__ import annotations

from dataclasses import dataclass

STANDARD_DOMAINS = ("", "ai.onnx")  # ONNX's own operators; anything else is a contrib or custom op
FLOATS = ("FP32", "FP16", "BF16")
NUMBERS = (*FLOATS, "INT32", "INT64")
SHAPING = (*NUMBERS, "BOOL")

# operator -> element types of its main tensor (10.15 matrix)
TYPES: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(
        """Abs Add ArgMax ArgMin Div Equal Greater GreaterOrEqual IsNaN Less LessOrEqual Max Min Mod Mul Neg
        Pad Pow Range Relu Sign Sub Sum ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean
        ReduceMin ReduceProd ReduceSum ReduceSumSquare ScatterElements ScatterND TopK""".split(),
        NUMBERS,
    ),
    **dict.fromkeys(
        """Acos Asin Atan AveragePool BatchNormalization Ceil Celu Clip Conv ConvTranspose Cos CumSum Dropout
        Einsum Elu Erf Exp Floor Gemm GlobalAveragePool GlobalMaxPool GroupNormalization HardSigmoid HardSwish
        InstanceNormalization LayerNormalization LeakyRelu Log LogSoftmax MatMul MaxPool PRelu Reciprocal
        Resize Round Selu Sigmoid Sin Softmax Softplus Softsign Sqrt Tan Tanh ThresholdedRelu Upsample
        RMSNormalization RotaryEmbedding Attention""".split(),
        FLOATS,
    ),
    **dict.fromkeys(
        """Concat DepthToSpace Expand Flatten Gather GatherElements GatherND Identity OneHot Reshape Shape Size
        Slice Split Squeeze Tile Transpose Trilu Unsqueeze Where""".split(),
        SHAPING,
    ),
    **dict.fromkeys(("And", "Not", "Or", "Xor"), ("BOOL",)),
    "Cast": (*NUMBERS, "UINT8", "BOOL"),
    "Constant": (*SHAPING, "FP8", "FP4", "INT4"),
    "ConstantOfShape": (*SHAPING, "FP8", "FP4", "INT4"),
    "Gelu": (*NUMBERS, "INT8"),
    "NonZero": ("FP32", "FP16"),
    "QuantizeLinear": FLOATS,
    "DequantizeLinear": ("INT8", "FP8", "FP4", "INT4"),
}

# which tensor carries the checked type, where it is not input 0: ("output", i) or ("input", i)
TYPED_TENSOR: dict[str, tuple[str, int]] = {
    "Constant": ("output", 0),
    "ConstantOfShape": ("output", 0),
    "Where": ("input", 1),
    "OneHot": ("input", 2),
}

# operator -> indices of inputs that must be build-time constants (initializers or Constant nodes)
CONSTANT_INPUTS: dict[str, tuple[int, ...]] = {
    "CumSum": (1,),
    "Dropout": (2,),
    **dict.fromkeys(
        """ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum
        ReduceSumSquare Squeeze Unsqueeze""".split(),
        (1,),
    ),
    "QuantizeLinear": (1, 2),
    "DequantizeLinear": (1, 2),
}
ZERO_POINTS = {"QuantizeLinear": 2, "DequantizeLinear": 2}  # input index that must be all zeros


@dataclass(frozen=True)
class Target:
    name: str
    device: str
    max_opset: int  # the highest opset confirmed for it (10.0's matrix: 9 to 20)
    added_later: tuple[str, ...]  # operators of the 10.15 matrix this version does not parse
    constant_inputs: dict[str, tuple[int, ...]]  # rules stricter than 10.15's


TARGETS: dict[str, Target] = {
    "trt-10.3": Target(
        "trt-10.3",
        "JetPack 6 (Orin)",
        20,
        (
            "Attention",
            "RMSNormalization",
            "RotaryEmbedding",
            "TensorScatter",
            "STFT",
            "BlackmanWindow",
            "HammingWindow",
            "HannWindow",
        ),
        {"Pad": (3,)},
    ),
    "trt-10.13": Target(
        "trt-10.13",
        "JetPack 7 (Thor)",
        20,
        ("Attention", "RMSNormalization", "RotaryEmbedding", "TensorScatter"),
        {},
    ),
}
