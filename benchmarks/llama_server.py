"""llama.cpp's C++ `llama-server`, built from the llama-cpp-python sdist, on the SmolVLM-256M shape.

    python -m benchmarks.llama_server [--isa avx2]   # builds (once, ~30 min on 2 cores), converts; prints paths

The sdist on PyPI vendors llama.cpp: `pip download --no-binary :all: llama-cpp-python`, then cmake
with the web UI, curl and OpenSSL off builds `llama-server` (parallel slots, continuous batching,
a prompt cache) and `llama-mtmd-cli`. Its own `convert_hf_to_gguf.py` writes the text model (Q8_0,
the int8 bundle's counterpart) and the vision projector (`--mmproj`, f32) from the same random
SmolVLM-256M-shaped checkpoint our bundles come from (benchmarks/smolvlm_speed.py). The
converter does not take Idefics3's text half as it is, so it reads a folder holding the same
safetensors and tokenizer with the text config flattened to a Llama config (the
`text_model.` prefix is its own rule). Everything lands in .cache/llamacpp/. The converter needs `pip install sentencepiece` (and torch,
safetensors, numpy, which the dev install has).
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

from serve.process import ChildServer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.join(REPO, ".cache", "llamacpp")
VERSION = "0.3.36"


def source() -> str:
    """The vendored llama.cpp of the llama-cpp-python sdist, downloaded and unpacked once."""
    src = os.path.join(ROOT, f"llama_cpp_python-{VERSION}", "vendor", "llama.cpp")
    if os.path.isdir(src):
        return src
    os.makedirs(ROOT, exist_ok=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-binary",
            ":all:",
            "--no-deps",
            f"llama-cpp-python=={VERSION}",
            "-d",
            ROOT,
        ],
        check=True,
    )
    subprocess.run(
        ["tar", "xzf", os.path.join(ROOT, f"llama_cpp_python-{VERSION}.tar.gz"), "-C", ROOT], check=True
    )
    return src


# llama.cpp's CPU kernels: this machine's best ("native"), or AVX2 without AVX-512 or VNNI (an
# AVX2-only CPU's kernels, for runs under benchmarks/avx2_proxy.py), each in its own build folder
ISA_FLAGS = {
    "native": ["-DGGML_NATIVE=ON"],
    "avx2": [
        "-DGGML_NATIVE=OFF",
        "-DGGML_AVX=ON",
        "-DGGML_AVX2=ON",
        "-DGGML_FMA=ON",
        "-DGGML_F16C=ON",
        "-DGGML_AVX512=OFF",
        "-DGGML_AVX512_VNNI=OFF",
        "-DGGML_AVX_VNNI=OFF",
    ],
}


def server_binary(isa: str = "native") -> str:
    """llama-server built for `isa` (ISA_FLAGS), built once (the native build with llama-mtmd-cli)."""
    src = source()
    build = os.path.join(src, "build" if isa == "native" else f"build-{isa}")
    binary = os.path.join(build, "bin", "llama-server")
    if os.path.exists(binary):
        return binary
    flags = [
        "-DCMAKE_BUILD_TYPE=Release",
        "-DLLAMA_BUILD_UI=OFF",
        "-DLLAMA_USE_PREBUILT_UI=OFF",
        "-DLLAMA_CURL=OFF",
        "-DLLAMA_OPENSSL=OFF",
        "-DLLAMA_BUILD_TESTS=OFF",
        *ISA_FLAGS[isa],
    ]
    targets = ["llama-server", "llama-mtmd-cli"] if isa == "native" else ["llama-server"]
    subprocess.run(["cmake", "-S", src, "-B", build, *flags], check=True)
    subprocess.run(
        ["cmake", "--build", build, "-j", str(os.cpu_count() or 1), "--target", *targets], check=True
    )
    return binary


def ggufs(ckpt: str) -> tuple[str, str]:
    """(text model Q8_0, mmproj f32) of the Idefics3 checkpoint `ckpt`, converted once."""
    text, mmproj = os.path.join(ROOT, "smolvlm-256m-shape-q8_0.gguf"), mmproj_gguf(ckpt, "f32")
    if not os.path.exists(text):
        flat = os.path.join(ROOT, "smolvlm-256m-shape-text")
        os.makedirs(flat, exist_ok=True)
        for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            if os.path.exists(os.path.join(ckpt, name)) and not os.path.lexists(os.path.join(flat, name)):
                os.symlink(os.path.join(os.path.abspath(ckpt), name), os.path.join(flat, name))
        with open(os.path.join(ckpt, "config.json")) as f:
            cfg = json.load(f)
        llama = cfg["text_config"] | {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
        with open(os.path.join(flat, "config.json"), "w") as f:
            json.dump(llama, f)
        convert(flat, "--outtype", "q8_0", "--outfile", text)
    return text, mmproj


def convert(*args: str) -> None:
    """llama.cpp's own convert_hf_to_gguf.py, with its vendored gguf package."""
    src = source()
    env = dict(os.environ, PYTHONPATH=os.path.join(src, "gguf-py"))
    subprocess.run([sys.executable, os.path.join(src, "convert_hf_to_gguf.py"), *args], check=True, env=env)


def mmproj_gguf(ckpt: str, outtype: str) -> str:
    """The vision projector of `ckpt` at `outtype` (f32, f16), converted once."""
    out = os.path.join(ROOT, f"mmproj-{outtype}.gguf")
    if not os.path.exists(out):
        convert(ckpt, "--mmproj", "--outtype", outtype, "--outfile", out)
    return out


class LlamaServer(ChildServer):
    """`llama-server` on 127.0.0.1 with `slots` parallel slots of `ctx_per_slot` positions each."""

    def __init__(
        self, text: str, mmproj: str, port: int, slots: int = 8, ctx_per_slot: int = 2048, isa: str = "native"
    ):
        cmd = [
            server_binary(isa),
            "-m",
            text,
            "--mmproj",
            mmproj,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "-np",
            str(slots),
            "-c",
            str(slots * ctx_per_slot),
            "-t",
            str(os.cpu_count() or 1),
            "--no-webui",
        ]
        self.port, self.url = port, f"http://127.0.0.1:{port}"
        log = os.path.join(ROOT, "llama-server.log")
        super().__init__(cmd, self.url + "/health", f"llama-server (log: {log})", log=log)


if __name__ == "__main__":
    import argparse

    from benchmarks.smolvlm_speed import build_checkpoint

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--isa", choices=list(ISA_FLAGS), default="native")
    a = ap.parse_args()
    print(
        server_binary(a.isa), *ggufs(build_checkpoint()), *glob.glob(os.path.join(ROOT, "*.gguf")), sep="\n"
    )
