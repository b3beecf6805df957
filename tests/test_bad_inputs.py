"""Bad input, as a user meets it: the console scripts run in a subprocess, and every case must end
with one line on stderr that names the problem, a non-zero exit, no traceback, and nothing
written or deleted. docs/bad_inputs.md lists the same cases with what each gets."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from core.bundle import load_bundle
from tests.conftest import REPO, console_script, export_lively
from tests.test_processors import _blank_png

BIN = os.path.dirname(sys.executable)


def cli(*args: str, cwd: str | os.PathLike = REPO) -> subprocess.CompletedProcess:
    """ARGS run by the console script that owns the command (installed, else its entry point)."""
    return subprocess.run(
        [*console_script(args[0]), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PYTHONPATH=REPO, TQDM_DISABLE="1"),
    )


def one_line_error(res: subprocess.CompletedProcess, *needles: str, code: int | None = None) -> None:
    lines = [
        line for line in res.stderr.splitlines() if line.strip() and not line.startswith(("INFO", "WARNING"))
    ]
    assert res.returncode != 0, res.stdout[-500:]
    if code is not None:
        assert res.returncode == code, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    assert len(lines) == 1, res.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.fixture(scope="module")
def made(tiny_tokenizer_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    _, bundle = export_lively("replace", tiny_tokenizer_dir, d)
    Image.new("RGB", (40, 30), (0, 90, 200)).save(d / "ok.png")
    return d, str(d / "ckpt"), bundle, str(d / "ok.png")


def _files(path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- output directories
def test_export_refuses_a_directory_it_did_not_write(made, tmp_path):
    _, ckpt, _, _ = made
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("my notes")
    (target / "sub").mkdir()
    (target / "sub" / "data.csv").write_text("1,2")
    before = _files(target)
    one_line_error(cli("onnx", ckpt, str(target)), str(target), "does not hold a bundle")
    assert _files(target) == before
    res = cli("onnx", ckpt, str(target), "--overwrite")  # --overwrite is no licence
    one_line_error(res, "does not hold a bundle")
    assert _files(target) == before


def test_replacing_a_bundle_needs_overwrite(made, tmp_path):
    _, ckpt, bundle, _ = made
    out = tmp_path / "b"
    shutil.copytree(bundle, out)
    before = _files(out)
    one_line_error(cli("onnx", ckpt, str(out)), "already holds a bundle", "--overwrite")
    assert _files(out) == before
    one_line_error(cli("quantize", str(out), str(out), "--mode", "int8-dynamic"), "another directory")
    res = cli("onnx", ckpt, str(out), "--overwrite")
    assert res.returncode == 0, res.stderr[-2000:]
    load_bundle(str(out))
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temp or old copy left


def test_an_interrupted_runs_leftover_is_named_and_kept(made, tmp_path):
    """A kill leaves the unfinished new output beside the target; the next run says so and leaves
    it alone (it cannot know no other run is still writing it)."""
    _, _, bundle, _ = made
    leftover = tmp_path / ".tmp-bundle-k9x2"
    leftover.mkdir()
    (leftover / "decoder.onnx").write_bytes(b"half")
    res = cli("quantize", bundle, str(tmp_path / "q"), "--mode", "int8-dynamic")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "1 unfinished directory from an interrupted run (.tmp-bundle-k9x2)" in res.stderr, res.stderr[
        -2000:
    ]
    assert (leftover / "decoder.onnx").read_bytes() == b"half"
    load_bundle(str(tmp_path / "q"))


def test_train_refuses_a_foreign_or_earlier_output_dir(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    one_line_error(
        cli("train", "-o", f"output_dir={tmp_path}", "-o", "max_training_steps=1"),
        "does not hold a training run",
    )
    assert os.listdir(tmp_path) == ["keep.txt"]
    run = tmp_path / "run"
    run.mkdir()
    (run / "train_config.json").write_text("{}")
    one_line_error(
        cli("train", "-o", f"output_dir={run}"),
        "already holds a training run",
        "--overwrite",
        "--resume to continue it",
    )


def test_train_without_a_target_says_how_long_it_will_run(tmp_path):
    res = cli(
        "train", "-o", f"output_dir={tmp_path / 'run'}", "-o", "max_training_steps=30", "-o", "eval_samples=0"
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "no target_accuracy: all 30 steps will run" in res.stderr
    assert re.search(r"about \d+ min for the 27 steps left at this pace", res.stderr), res.stderr[-2000:]


def test_bench_replaces_only_its_own_default_chart(made, tmp_path):
    """Without --plot, bench writes bench.png in the current directory: again over its own chart,
    never over another file of that name (refused before measuring, the file untouched)."""
    _, _, bundle, image = made
    args = ["bench", bundle, "--image", image, "--max-new-tokens", "2", "--repeats", "1", "--growth", ""]

    def bench(cwd) -> subprocess.CompletedProcess:
        return cli(*args, cwd=cwd)

    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    ours.mkdir(), theirs.mkdir()
    for _ in range(2):  # the second run replaces the first run's chart
        res = bench(ours)
        assert res.returncode == 0 and (ours / "bench.png").stat().st_size > 0, res.stderr[-2000:]
    Image.new("RGB", (8, 8)).save(theirs / "bench.png")
    before = _files(theirs)
    one_line_error(bench(theirs), "bench.png exists and bench did not write it", "--plot")
    assert _files(theirs) == before


# ----------------------------------------------------------------------------- numbers
@pytest.mark.parametrize(
    "option, value",
    [
        ("--max-new-tokens", "-1"),
        ("--max-new-tokens", "0"),
        ("--max-new-tokens", "10000000"),
        ("--temperature", "-1"),
        ("--top-k", "-3"),
        ("--top-p", "0"),
        ("--top-p", "1.5"),
        ("--repetition-penalty", "0"),
        ("--max-new-tokens", "many"),
    ],
)
def test_run_refuses_bad_numbers(made, option, value):
    _, _, bundle, image = made
    one_line_error(cli("run", bundle, "--image", image, "--prompt", "Hi?", option, value), option, code=2)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["quantize", "B", "OUT", "--mode", "int8-dynamic", "--samples", "0"], "--samples"),
        (["quantize", "B", "OUT", "--mode", "int3"], "--mode"),
        (["validate", "B", "--reference", "C", "--samples", "-4"], "--samples"),
        (["validate", "B", "--reference", "C", "--threshold", "kl"], "--threshold"),
        (["bench", "B", "--repeats", "0"], "--repeats"),
        (["bench", "B", "--max-new-tokens", "1"], "--max-new-tokens"),
        (["bench", "B", "--growth", "4,x"], "--growth"),
        (["trt", "B", "OUT", "--max-batch", "0"], "--max-batch"),
        (["onnx", "C", "OUT", "--opset", "12"], "--opset"),
        (["demo", "--test-samples", "0"], "--test-samples"),
    ],
)
def test_every_numeric_option_refuses_nonsense(made, tmp_path, args, needle):
    _, ckpt, bundle, _ = made
    args = [{"B": bundle, "C": ckpt, "OUT": str(tmp_path / "out")}.get(a, a) for a in args]
    one_line_error(cli(*args), needle)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "override",
    [
        "batch_size=-1",
        "max_training_steps=0",
        "lr_mp=-1e-3",
        "target_accuracy=2",
        "eval_samples=many",
        "mixed_precision=fp8",
    ],
)
def test_train_overrides_are_checked(tmp_path, override):
    one_line_error(
        cli("train", "-o", f"output_dir={tmp_path / 'run'}", "-o", override), override.split("=")[0]
    )
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- files
def test_decompression_bomb_and_unreadable_images(made, tmp_path):
    _, _, bundle, _ = made
    _blank_png(tmp_path / "bomb.png", 40000, 40000)
    one_line_error(cli("run", bundle, "--image", str(tmp_path / "bomb.png"), "--prompt", "Hi?"), "bomb.png")
    (tmp_path / "text.jpg").write_text("not an image")
    one_line_error(
        cli("run", bundle, "--image", str(tmp_path / "text.jpg"), "--prompt", "Hi?"),
        "text.jpg: not a readable image",
    )
    one_line_error(
        cli("run", bundle, "--image", str(tmp_path / "missing.png"), "--prompt", "Hi?"), "missing.png"
    )


def test_damaged_checkpoints(made, tmp_path):
    d, ckpt, _, image = made
    truncated = tmp_path / "truncated"
    shutil.copytree(ckpt, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    for command in (
        ["generate", str(truncated), "--image", image, "--prompt", "Hi?"],
        ["onnx", str(truncated), str(tmp_path / "o1")],
    ):
        one_line_error(cli(*command), "model.safetensors", "not a valid or complete safetensors file")

    garbled = tmp_path / "garbled"
    shutil.copytree(ckpt, garbled)
    cfg = json.loads((garbled / "config.json").read_text())
    (garbled / "config.json").write_text(json.dumps(cfg | {"lm_hidden_dim": "big"}))
    one_line_error(
        cli("generate", str(garbled), "--image", image, "--prompt", "Hi?"),
        "config.json",
        "lm_hidden_dim = 'big' is not a valid int",
    )

    pickle = tmp_path / "pickle"
    pickle.mkdir()
    shutil.copy2(os.path.join(ckpt, "config.json"), pickle / "config.json")
    (pickle / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    for command in (
        ["generate", str(pickle), "--image", image, "--prompt", "Hi?"],
        ["onnx", str(pickle), str(tmp_path / "o2")],
    ):
        one_line_error(cli(*command), "pytorch_model.bin", "pickle checkpoint: refused", "model.safetensors")
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_damaged_bundles(made, tmp_path):
    _, _, bundle, image = made
    b = tmp_path / "b"
    shutil.copytree(bundle, b)
    (b / "decoder.onnx").write_bytes((b / "decoder.onnx").read_bytes()[:1000])
    one_line_error(
        cli("run", str(b), "--image", image, "--prompt", "Hi?"), "decoder.onnx", "truncated or replaced"
    )
    (b / "manifest.json").write_text("{not json")
    one_line_error(cli("run", str(b), "--image", image, "--prompt", "Hi?"), "manifest.json: not valid JSON")
    one_line_error(cli("run", str(tmp_path), "--image", image, "--prompt", "Hi?"), "no manifest.json")


# ----------------------------------------------------------------------------- kill -9
def _bundle_state(path) -> str | None:
    """The manifest's creation stamp if `path` is a complete, verified bundle; None if it is gone."""
    if not os.path.exists(path):
        return None
    return load_bundle(str(path)).manifest.created + json.dumps(load_bundle(str(path)).manifest.files)


@pytest.mark.slow
@pytest.mark.parametrize("command", ["onnx", "quantize"])
def test_kill_9_leaves_the_old_or_the_new_output(made, tmp_path, command):
    """SIGKILL the command at points spread over its whole run: the target is then always either
    the old bundle or a complete new one (it verifies), and the user's file beside it survives."""
    import signal
    import time

    _, ckpt, bundle, _ = made
    out = tmp_path / "out"
    (tmp_path / "user.txt").write_text("mine")
    args = {
        "onnx": ["onnx", ckpt, str(out), "--overwrite"],
        "quantize": ["quantize", bundle, str(out), "--mode", "int8-dynamic", "--overwrite"],
    }[command]
    assert cli(*args).returncode == 0
    cmd = console_script(args[0])
    env = dict(os.environ, PYTHONPATH=REPO, TQDM_DISABLE="1")
    t0 = time.time()
    subprocess.run([*cmd, *args], cwd=REPO, capture_output=True, env=env, check=True)
    duration = time.time() - t0
    seen = {"old": 0, "new": 0}
    for k in range(1, 9):
        old = _bundle_state(out)
        proc = subprocess.Popen(
            [*cmd, *args], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env
        )
        time.sleep(duration * k / 8)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        now = _bundle_state(out)  # raises if the target is half-written
        assert now is not None, f"kill at {k}/8 of the run left no {out}"
        seen["old" if now == old else "new"] += 1
        assert (tmp_path / "user.txt").read_text() == "mine"
    assert seen["old"] >= 1, seen  # some kills landed before the swap


# ----------------------------------------------------------------------------- bundles that reach outside
def _edit_manifest(b, edit) -> None:
    m = json.loads((b / "manifest.json").read_text())
    edit(m)
    (b / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize(
    "case, needle",
    [
        ("absolute graph path", "not a relative path inside the bundle"),
        ("graph path with ..", "resolves outside the bundle"),
        ("graph linked outside", "resolves outside the bundle"),
        ("graph not in the file list", "not in the manifest's file list"),
        ("empty file list", "not in the manifest's file list"),
        ("file entry outside", "resolves outside the bundle"),
        ("unlisted file", "not in the manifest's file list"),
    ],
)
def test_a_bundle_stays_in_its_folder(made, tmp_path, case, needle):
    """Every path a manifest names is relative and resolves inside the bundle, and every graph and
    file is listed with its hash: anything else is refused in one line, before any graph loads."""
    _, _, bundle, image = made
    b, outside = tmp_path / "b", tmp_path / "outside"
    shutil.copytree(bundle, b)
    shutil.copytree(bundle, outside)
    decoder = b / "decoder.onnx"
    if case == "absolute graph path":
        _edit_manifest(b, lambda m: m["graphs"]["decoder"].update(file=str(outside / "decoder.onnx")))
    elif case == "graph path with ..":
        _edit_manifest(b, lambda m: m["graphs"]["decoder"].update(file="../outside/decoder.onnx"))
    elif case == "graph linked outside":
        decoder.unlink()
        decoder.symlink_to(outside / "decoder.onnx")
    elif case == "graph not in the file list":
        _edit_manifest(b, lambda m: m["files"].pop("decoder.onnx"))
        decoder.unlink()
        (b / "decoder.onnx").write_bytes((outside / "decoder.onnx").read_bytes()[:-7] + b"corrupt")
    elif case == "empty file list":
        _edit_manifest(b, lambda m: m.update(files={}))
    elif case == "file entry outside":
        _edit_manifest(b, lambda m: m["files"].update({"../outside/config.json": m["files"]["config.json"]}))
    elif case == "unlisted file":
        (b / "decoder.onnx.data").write_bytes(b"\0" * 64)
    res = cli("run", str(b), "--image", image, "--prompt", "Hi?")
    one_line_error(res, needle)
    if case == "graph linked outside":  # the message names the manifest's path, not the link's target
        assert str(outside) not in res.stderr


def test_quantize_through_a_link_to_its_source_is_refused(made, tmp_path):
    """`quantize --overwrite srclink src` (srclink -> src): the guard compares real paths, so the
    source is never replaced by its own output."""
    _, _, bundle, _ = made
    src = tmp_path / "src"
    shutil.copytree(bundle, src)
    link = tmp_path / "srclink"
    link.symlink_to(src)
    before = _files(src)
    one_line_error(
        cli("quantize", str(link), str(src), "--mode", "int8-dynamic", "--overwrite"),
        "another directory than the source",
    )
    assert _files(src) == before
    one_line_error(
        cli("quantize", str(src), str(link / "inner"), "--mode", "int8-dynamic"),
        "must not hold one another",
    )
    assert _files(src) == before
