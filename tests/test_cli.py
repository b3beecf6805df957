"""The command line as a user runs it: each console script with its own job, the runtime's
commands on a torch-free install, and one clear line for commands that need the torch extra."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
from PIL import Image

from runtime.pipeline import VLMPipeline
from tests.conftest import EXPORT_COMMANDS, REPO, export_lively
from tests.test_architecture import ALLOWED

BLOCK_TORCH = """
import os, sys
BLOCKED = ("torch", "transformers", "safetensors") + tuple(os.environ.get("ALSO_BLOCK", "").split())
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError("No module named " + repr(name))
sys.meta_path.insert(0, Block())
from cli.main import export_main, main
try:
    (export_main if sys.argv[1] in export_main.commands else main)(sys.argv[1:])
finally:
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))
    assert not loaded, loaded
"""


@pytest.fixture(scope="module")
def made(tiny_tokenizer_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    _, bundle = export_lively("replace", tiny_tokenizer_dir, d)
    Image.new("RGB", (50, 40), (200, 30, 30)).save(d / "red.png")
    return bundle, str(d / "ckpt"), str(d / "red.png")


def _without_torch(*args: str, also: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(BLOCK_TORCH), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=REPO, ALSO_BLOCK=also),
        timeout=120,
    )


def test_run_works_without_torch(made):
    bundle, _, image = made
    expected = VLMPipeline.from_bundle(bundle).generate(image, "What is it?", max_new_tokens=10)
    res = _without_torch("run", bundle, "--image", image, "--prompt", "What is it?", "--max-new-tokens", "10")
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout == expected + "\n"


def test_run_and_generate_answer_text_only_prompts_as_the_library(made):
    """No --image: the same answer as VLMPipeline.generate([], ...) and model.generate(ids, None)."""
    import torch

    from nanovlm.vision_language_model import VisionLanguageModel

    bundle, ckpt, _ = made
    pipe = VLMPipeline.from_bundle(bundle)
    library = pipe.generate([], "Hello there?", max_new_tokens=10)
    res = _without_torch("run", bundle, "--prompt", "Hello there?", "--max-new-tokens", "10")
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout == library + "\n"

    model = VisionLanguageModel.from_pretrained(ckpt)
    ids = torch.from_numpy(pipe.prepare([[]], ["Hello there?"]).input_ids)
    out = model.generate(ids, None, max_new_tokens=10)[0].tolist()
    eos = model.tokenizer.eos_token_id
    expected = model.tokenizer.decode(out[: out.index(eos)] if eos in out else out)
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "cli.main",
            "generate",
            ckpt,
            "--prompt",
            "Hello there?",
            "--max-new-tokens",
            "10",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout == expected + "\n"


@pytest.mark.parametrize("command", ["generate", "validate", "onnx", "bench", "train", "demo"])
def test_torch_commands_name_the_extra_on_a_torch_free_install(made, command, tmp_path):
    bundle, ckpt, image = made
    args = {
        "generate": [ckpt, "--image", image, "--prompt", "Hi?"],
        "validate": [bundle, "--reference", ckpt],
        "onnx": [ckpt, str(tmp_path / "out")],
        "bench": [bundle, "--reference", ckpt],
        "train": [],
        "demo": ["--output-dir", str(tmp_path / "demo")],
    }[command]
    res = _without_torch(command, *args)
    assert res.returncode == 1, res.stderr[-2000:]
    # this checkout is installed editable (make setup), and the command ran in it
    assert "needs the PyTorch reference" in res.stderr and "pip install -e '.[torch]'" in res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() and not (tmp_path / "demo").exists()


def test_bench_without_matplotlib_writes_its_table_and_json(made, tmp_path):
    """A torch-free device often lacks matplotlib: bench still prints its table and writes --json,
    and says in one line that the chart needs an extra."""
    import json

    bundle, _, image = made
    out = tmp_path / "bench.json"
    res = _without_torch(
        "bench",
        bundle,
        "--image",
        image,
        "--repeats",
        "1",
        "--max-new-tokens",
        "4",
        "--json",
        str(out),
        also="matplotlib",
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "Traceback" not in res.stderr and os.path.basename(bundle) in res.stdout, res.stdout
    assert json.loads(out.read_text())["rows"]
    notes = [x for x in res.stderr.splitlines() if x.startswith("chart")]
    assert notes == ["chart skipped: it needs matplotlib (pip install -e '.[jetson]')"], res.stderr
    assert not os.path.exists(os.path.join(REPO, "bench.png")) or "bench.png" not in res.stdout


def test_each_console_script_has_its_own_job():
    """nanovlm trains, answers and serves; nanovlm-export makes and checks bundles. A command given
    to the other script fails in one line that names the right one."""

    from cli.main import export_main, main

    jobs = {main: {"train", "demo", "generate", "run", "watch", "serve"}, export_main: set(EXPORT_COMMANDS)}
    for group, commands in jobs.items():
        assert set(group.commands) == commands
    assert main.help != export_main.help
    scripts = open(os.path.join(REPO, "pyproject.toml")).read()
    assert 'nanovlm = "cli.main:main"' in scripts and 'nanovlm-export = "cli.main:export_main"' in scripts
    for script, command, right in (
        ("nanovlm", "onnx", "nanovlm-export"),
        ("nanovlm-export", "run", "nanovlm"),
    ):
        res = subprocess.run(
            [
                sys.executable,
                "-c",
                f"from cli.main import main, export_main; {'main' if script == 'nanovlm' else 'export_main'}()",
                command,
                "x",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert res.returncode == 2 and res.stderr.strip().splitlines() == [
            f"Error: {command!r} is a command of {right}: run `{right} {command}`"
        ], res.stderr


def test_quantize_help_says_what_each_mode_is():
    """Each --mode is explained by its recipe's summary (core/recipes.py), not only named."""
    from click.testing import CliRunner

    from cli.main import export_main
    from core.recipes import QUANTIZE_MODES, RECIPES

    out = " ".join(CliRunner().invoke(export_main, ["quantize", "--help"], terminal_width=400).output.split())
    for mode in QUANTIZE_MODES:
        assert f"{mode}: {RECIPES[mode].summary}" in out, mode
    assert "--samples INTEGER RANGE Calibration samples" in out and "8<=x<=100000" in out  # the real minimum


def _install_in_fresh_venv(tmp_path, extras: str):
    """pip install a copy of the package (so the build leaves nothing in the checkout), with
    `extras` such as "[jetson]", into a fresh venv; -> the venv's path."""
    venv, src = tmp_path / "venv", tmp_path / "src"
    for name in ALLOWED:  # every top-level package
        shutil.copytree(os.path.join(REPO, name), src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(os.path.join(REPO, name), src / name)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", f"{src}{extras}"],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert pip.returncode == 0, pip.stderr[-3000:]
    return venv


def _importable(venv, modules: tuple[str, ...], cwd) -> str:
    """Which of `modules` the venv's Python can import, as it prints the list."""
    code = f"import importlib.util as u; print([m for m in {modules!r} if u.find_spec(m)])"
    res = subprocess.run(
        [str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True, cwd=str(cwd)
    )
    return res.stdout.strip()


@pytest.mark.slow
def test_pip_install_without_extras_runs_nanovlm_run(made, tmp_path):
    """A real torch-free install: a fresh venv, `pip install .` (no extras), then the console
    script answers like the library, and `nanovlm generate` names the extra to install."""
    bundle, ckpt, image = made
    venv = _install_in_fresh_venv(tmp_path, "")
    assert _importable(venv, ("torch", "transformers", "onnx"), tmp_path) == "[]"
    expected = VLMPipeline.from_bundle(bundle).generate(image, "What is it?", max_new_tokens=10)
    res = subprocess.run(
        [
            str(venv / "bin" / "nanovlm"),
            "run",
            bundle,
            "--image",
            image,
            "--prompt",
            "What is it?",
            "--max-new-tokens",
            "10",
        ],
        capture_output=True,
        text=True,
        cwd=str(tmp_path),
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout == expected + "\n"
    gen = subprocess.run(
        [str(venv / "bin" / "nanovlm"), "generate", ckpt, "--image", image, "--prompt", "Hi"],
        capture_output=True,
        text=True,
        cwd=str(tmp_path),
        timeout=300,
    )
    # installed from a folder (not editable): the hint names that folder, not the package index
    assert gen.returncode == 1 and f"pip install '{tmp_path / 'src'}[torch]'" in gen.stderr
    assert "Traceback" not in gen.stderr


def test_validate_without_torch_against_the_stored_reference(made, tmp_path):
    """The device-side check: `validate BUNDLE` with torch unimportable compares the bundle with
    the PyTorch results stored at export: passes for the bundle, fails (exit 1) for a perturbed
    copy, and names --reference for a bundle without stored results."""
    import json
    import shutil

    import numpy as np
    import onnx

    from core.bundle import Manifest

    bundle, _, _ = made
    ok = _without_torch("validate", bundle)
    assert ok.returncode == 0 and "passed" in ok.stdout, ok.stderr[-2000:]
    assert "| cases | 4 |" in ok.stdout and "| steps |" in ok.stdout

    bad = tmp_path / "bad"
    shutil.copytree(bundle, bad)
    m = onnx.load(str(bad / "decoder.onnx"))
    w = next(i for i in m.graph.initializer if "MatMul" in i.name or "proj" in i.name)
    arr = onnx.numpy_helper.to_array(w) + np.random.default_rng(0).normal(0, 0.5, tuple(w.dims)).astype(
        np.float32
    )
    w.CopyFrom(onnx.numpy_helper.from_array(arr, w.name))
    onnx.save(m, str(bad / "decoder.onnx"))
    Manifest.from_dict(json.loads((bad / "manifest.json").read_text()), "bad").write(str(bad))
    res = _without_torch("validate", str(bad))
    assert res.returncode == 1 and "FAILED: " in res.stderr and "kl_mean" in res.stderr, res.stderr[-2000:]

    old = tmp_path / "old"
    shutil.copytree(bundle, old)
    data = json.loads((old / "manifest.json").read_text())
    data.pop("reference")
    (old / "manifest.json").write_text(json.dumps(data))
    res = _without_torch("validate", str(old))
    assert res.returncode == 1 and "no stored PyTorch reference" in res.stderr and "--reference" in res.stderr


@pytest.mark.slow
def test_the_jetson_extra_runs_the_device_path_without_torch(made, tmp_path):
    """`pip install '.[jetson]'` in a fresh venv (TensorRT excepted: JetPack brings it) gives every
    module the device path imports, and check / validate / trt --print-trtexec / run / bench work
    there (bench with its power columns, which say n/a off a Jetson)."""
    bundle, _, image = made
    venv = _install_in_fresh_venv(tmp_path, "[jetson]")
    py = str(venv / "bin" / "python")
    modules = [
        "runtime.pipeline",
        "runtime.onnx_backend",
        "trt.backend",
        "trt.plan",
        "trt.build",
        "trt.check",
        "evaluation.metrics",
        "evaluation.bench",
        "cli.main",
        "cuda.bindings.runtime",
        "onnx",
        "matplotlib",
    ]
    code = (
        "import importlib.util as u, importlib; "
        f"[importlib.import_module(m) for m in {modules!r}]; "
        "print([m for m in ('torch', 'transformers', 'tensorrt') if u.find_spec(m)])"
    )
    res = subprocess.run([py, "-c", code], capture_output=True, text=True, cwd=str(tmp_path), timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "[]", res.stderr[-3000:]
    exe = str(venv / "bin" / "nanovlm-export")
    for args, expect in (
        (["check", bundle], "trt-10.3: ok"),
        (["validate", bundle], "passed"),
        (["trt", bundle, str(tmp_path / "e"), "--print-trtexec"], "trtexec --onnx=decoder.onnx"),
        (
            [
                "bench",
                bundle,
                "--image",
                image,
                "--max-new-tokens",
                "2",
                "--repeats",
                "1",
                "--plot",
                str(tmp_path / "bench.png"),
            ],
            "tokens/J",
        ),
    ):
        res = subprocess.run([exe, *args], capture_output=True, text=True, cwd=str(tmp_path), timeout=600)
        assert res.returncode == 0 and expect in res.stdout, (args, res.stderr[-2000:])


@pytest.mark.slow
def test_the_serve_extra_serves_without_torch(made, tmp_path):
    """`pip install '.[serve]'` in a fresh venv: no torch, and `nanovlm serve` from there answers
    like the library and serves its page (the HTML ships as package data)."""
    import json
    import urllib.request

    from serve.process import ServerProcess

    bundle, _, image = made
    venv = _install_in_fresh_venv(tmp_path, "[serve]")
    assert _importable(venv, ("torch", "transformers", "onnx"), tmp_path) == "[]"
    expected = VLMPipeline.from_bundle(bundle).generate([], "What is it?", max_new_tokens=8)
    server = ServerProcess(bundle, python=str(venv / "bin" / "python"))
    try:
        body = json.dumps(
            {"messages": [{"role": "user", "content": "What is it?"}], "max_tokens": 8}
        ).encode()
        req = urllib.request.Request(
            server.url + "/v1/chat/completions", body, {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=120) as r:
            assert json.loads(r.read())["choices"][0]["message"]["content"] == expected
        with urllib.request.urlopen(server.url + "/", timeout=30) as r:
            assert "/v1/chat/completions" in r.read().decode()
    finally:
        server.stop()


def test_every_option_of_every_command_says_what_it_does():
    from click import Option

    from cli.main import export_main, main

    bare = [
        f"{name} {'/'.join(p.opts)}"
        for name, cmd in (main.commands | export_main.commands).items()
        for p in cmd.params
        if isinstance(p, Option) and not p.help
    ]
    assert not bare, bare
