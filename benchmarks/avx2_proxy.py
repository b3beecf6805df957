"""Run a command with the kernels an AVX2-only CPU gets, on a machine that has AVX-512.

    python -m benchmarks.avx2_proxy --check
    python -m benchmarks.avx2_proxy [--llama-lib DIR] -- python -m benchmarks.runtime_decode

The speed bars hold on both CPU kinds, but most machines here have AVX-512 VNNI, and qemu's
emulated Haswell (tests/test_portability.py) is right about results but says nothing about speed.
This runs the command natively with every library held to its AVX2 code:

- ONNX Runtime: MLAS chooses its kernels once, from CPUID and XGETBV. The installed package is
  copied to .cache/avx2-proxy/ and its extension patched in two ways: every XGETBV reports XCR0 =
  0x7 (x87, SSE and AVX state; no AVX-512 state), so MLAS skips its AVX-512 branch, and MLAS's
  AVX-VNNI (VEX) branch is never taken. The installed package is not touched; the copy comes
  first on PYTHONPATH for the command only. Needs objdump (binutils) to find the instructions.
- PyTorch: its documented switches ATEN_CPU_CAPABILITY=avx2, DNNL_MAX_CPU_ISA=AVX2 and
  MKL_ENABLE_INSTRUCTIONS=AVX2 (MKL ignores the last on AMD CPUs, where its sgemm already runs
  AVX2-class code: docs/quantization.md).
- llama.cpp: --llama-lib names a directory with a build of libllama/libggml without AVX-512
  (e.g. CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
  -DGGML_AVX512=OFF -DGGML_AVX_VNNI=OFF" pip install --target DIR llama-cpp-python), passed as
  llama-cpp-python's LLAMA_CPP_LIB_PATH. Without it llama.cpp keeps this machine's build.

Before the command, a probe checks that the patch took: a DynamicQuantizeMatMul whose weight
column holds 127 + 127 pairs must come out ~49% low (AVX2's VPMADDUBSW saturates its int16 pair
sum) through the patched copy, and exact through the installed one.

What this is not: an AVX2-only CPU. The core, caches, clock and memory stay this machine's, and a
core that executes 512-bit vectors natively runs 256-bit code at half its peak, as an AVX2-only
core of the same design would. Ratios between backends measured in one run under the proxy show
which kernels each backend gets and where the time goes; absolute figures are this machine's.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROXY = REPO / ".cache" / "avx2-proxy"
XGETBV = bytes.fromhex("0f01d0")
# mov al, 7; nop: XCR0's low byte = x87 | SSE | AVX state, so no AVX-512 state (bits 5-7); the
# bits above keep what eax held, which MLAS reads only for AMX (an AMX kernel would not saturate,
# and the probe below would refuse it)
REPORT_XCR0 = bytes.fromhex("b00790")
# MLAS: mov eax, 7; mov ecx, 1; cpuid; test al, 0x10 (AVX-VNNI); je -> jmp
AVX_VNNI_TEST = bytes.fromhex("b807000000b9010000000fa2a81074")
TORCH_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "DNNL_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}

PROBE = r"""
import json, numpy as np, onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
K = 64
B = np.stack([np.full(K, 127), np.tile([127, 1], K // 2)], 1).astype(np.int8)
node = helper.make_node("DynamicQuantizeMatMul", ["A", "B", "S"], ["Y"], domain="com.microsoft")
g = helper.make_graph([node], "probe", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [1, K])],
                      [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 2])],
                      [numpy_helper.from_array(B, "B"), numpy_helper.from_array(np.full(2, 1 / 128, np.float32), "S")])
m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
y = s.run(None, {"A": np.ones((1, K), np.float32)})[0][0]
exact = B.astype(np.int64).sum(0) / 128
print(json.dumps({"onnxruntime": ort.__file__, "error": (np.abs(y - exact) / exact).tolist()}))
"""


def installed_onnxruntime() -> Path:
    import onnxruntime

    return Path(onnxruntime.__file__).parent


def _load_segments(so: bytes) -> list[tuple[int, int, int]]:
    """(file offset, virtual address, file size) of each PT_LOAD segment of an ELF64 file."""
    if so[:4] != b"\x7fELF" or so[4] != 2:
        raise ValueError("not an ELF64 file")
    (phoff,) = struct.unpack_from("<Q", so, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", so, 0x36)
    out = []
    for i in range(phnum):
        p_type, _, p_offset, p_vaddr, _, p_filesz = struct.unpack_from("<IIQQQQ", so, phoff + i * phentsize)
        if p_type == 1:
            out.append((p_offset, p_vaddr, p_filesz))
    return out


def _xgetbv_offsets(path: Path, so: bytes) -> list[int]:
    """File offsets of the XGETBV instructions objdump finds in `path`."""
    if shutil.which("objdump") is None:
        raise SystemExit("avx2_proxy: objdump not found (apt-get install binutils)")
    listing = subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", str(path)], capture_output=True, text=True, check=True
    ).stdout
    addresses = [int(m.group(1), 16) for m in re.finditer(r"^\s*([0-9a-f]+):\s+xgetbv\b", listing, re.M)]
    offsets, segments = [], _load_segments(so)
    for va in addresses:
        seg = next(((o, v) for o, v, size in segments if v <= va < v + size), None)
        if seg is None or so[va - seg[1] + seg[0] : va - seg[1] + seg[0] + 3] != XGETBV:
            raise SystemExit(f"avx2_proxy: {path.name}: xgetbv at {va:#x} is not where objdump says")
        offsets.append(va - seg[1] + seg[0])
    return offsets


def build_proxy() -> Path:
    """The patched copy of the installed onnxruntime package (reused while the install is unchanged)."""
    src = installed_onnxruntime()
    ext = next(src.glob("capi/onnxruntime_pybind11_state*.so"), None)
    if ext is None:
        raise SystemExit(f"avx2_proxy: no onnxruntime_pybind11_state extension under {src / 'capi'}")
    stamp = {"source": str(ext), "size": ext.stat().st_size, "mtime": ext.stat().st_mtime}
    stamp_file = PROXY / "stamp.json"
    if stamp_file.exists() and json.loads(stamp_file.read_text()) == stamp:
        return PROXY
    so = bytearray(ext.read_bytes())
    sites = _xgetbv_offsets(ext, bytes(so))
    vnni = [m.start() for m in re.finditer(re.escape(AVX_VNNI_TEST), so)]
    if not sites or len(vnni) != 1:
        raise SystemExit(
            f"avx2_proxy: {ext.name}: found {len(sites)} xgetbv and {len(vnni)} AVX-VNNI "
            "tests (need >= 1 and exactly 1): this onnxruntime build is not one this tool knows"
        )
    for off in sites:
        so[off : off + 3] = REPORT_XCR0
    so[vnni[0] + len(AVX_VNNI_TEST) - 1] = 0xEB  # je -> jmp: skip the AVX-VNNI kernels
    tmp = PROXY.with_name(PROXY.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)  # our own unfinished copy
    shutil.copytree(src, tmp / "onnxruntime", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp / "onnxruntime" / "capi" / ext.name).write_bytes(bytes(so))
    (tmp / "stamp.json").write_text(json.dumps(stamp))
    if PROXY.exists():
        shutil.rmtree(PROXY)  # an earlier copy this tool made for another install
    tmp.rename(PROXY)
    print(
        f"avx2_proxy: patched {len(sites)} xgetbv and the AVX-VNNI test in a copy of {src}", file=sys.stderr
    )
    return PROXY


def proxy_env(llama_lib: str | None) -> dict[str, str]:
    from evaluation.bench import AVX2_PROXY_ENV  # benchmarks name the CPU kind by it

    env = dict(os.environ) | TORCH_ENV | {AVX2_PROXY_ENV: "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(build_proxy()), env.get("PYTHONPATH")) if p)
    if llama_lib:
        env["LLAMA_CPP_LIB_PATH"] = llama_lib
    return env


def probe(env: dict[str, str] | None) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def check(env: dict[str, str]) -> None:
    """Exits unless the patched copy saturates the 127 + 127 column and the installed one does not."""
    native, proxied = probe(None), probe(env)
    print(
        f"installed onnxruntime: 127+127 column error {native['error'][0]:.3f}, 127/1 column {native['error'][1]:.3f}"
    )
    print(
        f"AVX2 proxy          : 127+127 column error {proxied['error'][0]:.3f}, 127/1 column {proxied['error'][1]:.3f}"
    )
    if native["error"][0] > 0.01:
        raise SystemExit("avx2_proxy: this CPU already saturates (no VNNI): run commands directly")
    if proxied["error"][0] < 0.1 or proxied["error"][1] > 1e-6:
        raise SystemExit(
            "avx2_proxy: the patched onnxruntime still uses VNNI kernels: the proxy did not take"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="only show that the proxy takes")
    ap.add_argument("--llama-lib", help="directory of an AVX2 build of libllama.so for llama-cpp-python")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="the command to run under the proxy")
    args = ap.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if args.llama_lib and not any(Path(args.llama_lib).glob("libllama.so*")):
        raise SystemExit(f"avx2_proxy: --llama-lib {args.llama_lib}: no libllama.so there")
    env = proxy_env(args.llama_lib)
    check(env)
    if args.check or not command:
        return
    print("avx2_proxy: running " + " ".join(command), file=sys.stderr)
    sys.exit(subprocess.run(command, env=env).returncode)


if __name__ == "__main__":
    main()
