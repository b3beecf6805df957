"""TensorRT calibration cache text, written from the same activation ranges as the QDQ bundle.

Format (what TensorRT's IInt8EntropyCalibrator2 writes and reads back):

    TRT-<version>-EntropyCalibration2
    <tensor name>: <scale as the 8 hex digits of its big-endian float32>

with scale = amax / 127. TensorRT 10.x uses it for implicit INT8 (deprecated there, gone in 11),
and the ONNX Runtime TensorRT EP reads it with `trt_int8_calibration_table_name` and
`trt_int8_use_native_calibration_table=True`. The version number only labels the file.
"""

from __future__ import annotations

import struct

from core.files import atomic_write

HEADER_SUFFIX = "-EntropyCalibration2"
DEFAULT_TRT_VERSION = 100300  # TensorRT 10.3 (JetPack 6): major * 10000 + minor * 100 + patch


def write_trt_cache(ranges: dict[str, float], path: str, trt_version: int = DEFAULT_TRT_VERSION) -> None:
    """ranges: {tensor name: amax}; written atomically."""
    if not ranges:
        raise ValueError("no activation ranges to write: the QDQ graph quantized no activations")
    lines = [f"TRT-{trt_version}{HEADER_SUFFIX}"]
    for name in sorted(ranges):
        amax = float(ranges[name])
        if not amax > 0 or amax != amax:
            raise ValueError(f"tensor {name!r}: range {amax} is not a positive number")
        if ":" in name or "\n" in name:
            raise ValueError(f"tensor name {name!r} cannot be written to a TensorRT cache")
        lines.append(f"{name}: {struct.pack('>f', amax / 127.0).hex()}")
    with atomic_write(path) as f:
        f.write("\n".join(lines) + "\n")


def read_trt_cache(path: str) -> tuple[int, dict[str, float]]:
    """-> (version, {tensor name: scale}); raises ValueError naming the line that does not parse."""
    with open(path) as f:
        lines = f.read().splitlines()
    if not lines or not lines[0].startswith("TRT-") or not lines[0].endswith(HEADER_SUFFIX):
        raise ValueError(f"{path}: first line {lines[0] if lines else ''!r} is not a TensorRT cache header")
    version = int(lines[0][len("TRT-") : -len(HEADER_SUFFIX)])
    scales = {}
    for k, line in enumerate(lines[1:], start=2):
        name, sep, value = line.rpartition(": ")
        if not sep or len(value) != 8:
            raise ValueError(f"{path}:{k}: {line!r} is not '<tensor>: <8 hex digits>'")
        scales[name] = struct.unpack(">f", bytes.fromhex(value))[0]
    return version, scales
