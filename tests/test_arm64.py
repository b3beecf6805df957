"""The torch-free runtime on emulated ARM64 CPUs: every bundle kind answers as on x86 and passes its
recipe's gates against the stored PyTorch results; a broken int8 zero point is caught; `nanovlm
serve` answers the OpenAI client from there.

The arm64 tier of CI (.ci/arm64) builds a Debian bookworm arm64 root (python3.11), installs this
checkout's wheel with the serve, jetson and video extras for aarch64 into a folder of its own, and
runs this file with ARM64_ROOT and ARM64_SITE pointing at them; qemu-user 10 emulates a named CPU:
Cortex-A76 (Raspberry Pi 5; dot-product instructions) and Cortex-A57 (Jetson Nano/TX2; none).
Never `-cpu max`: QEMU 7.2's gave wrong int8/int4 answers (its SME emulation). Emulation proves
the answers, not the speed (docs/jetson.md).
"""

import json
import os
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from runtime.pipeline import VLMPipeline
from serve.process import ChildServer, free_port
from tests.arm64_check import greedy_ids
from tests.conftest import export_lively

ROOT, SITE = os.environ.get("ARM64_ROOT"), os.environ.get("ARM64_SITE")
HERE = os.path.dirname(os.path.abspath(__file__))
CPUS = ("cortex-a76", "cortex-a57")
TIE = 0.05  # a top-1 logit margin below this is a near-tie: rounding of another ISA's kernels may flip it
pytestmark = [
    pytest.mark.arm64,
    pytest.mark.skipif(
        not (ROOT and SITE), reason="the arm64 tier (.ci/arm64) sets ARM64_ROOT and ARM64_SITE"
    ),
]


def arm_python(cpu: str) -> list[str]:
    return ["qemu-aarch64", "-L", ROOT, "-cpu", cpu, os.path.join(ROOT, "usr/bin/python3.11")]


def arm_env() -> dict:
    return dict(os.environ, PYTHONPATH=SITE, OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def plan(tiny_tokenizer_dir, tmp_path_factory):
    """Bundles of every kind the CPU runtime runs, for the tiny model and a SmolVLM-shaped tiny
    checkpoint (image splitting), with the answers x86 gives."""
    from calibration.quantize import quantize_bundle
    from export.onnx_export import export_onnx
    from tests.test_idefics3 import write_idefics3

    d = tmp_path_factory.mktemp("arm64")
    export_lively("replace", tiny_tokenizer_dir, d / "tiny")
    write_idefics3(d / "smolvlm-ckpt", tie=False)
    bundles = {}
    for name, ckpt in (("tiny", str(d / "tiny" / "ckpt")), ("smolvlm", str(d / "smolvlm-ckpt"))):
        standard, fused = str(d / f"{name}-fp32"), str(d / f"{name}-fp32-fused")
        export_onnx(ckpt, standard)
        export_onnx(ckpt, fused, decoder="fused")
        bundles[f"{name} fp32"], bundles[f"{name} fp32 fused"] = standard, fused
        for mode, src in (
            ("int8-dynamic", fused),
            ("int8-w8a8", fused),
            ("int8-static", standard),
            ("int4", fused),
        ):
            out = str(d / f"{name}-{mode}")
            quantize_bundle(src, out, mode, samples=8)
            bundles[f"{name} {mode}"] = out
    from skimage import data

    photo = d / "photo.png"
    Image.fromarray(data.astronaut()).resize((96, 64)).save(photo)  # tiles, and a global view
    cases = [
        {"image": str(photo), "prompt": "What is in the picture?", "max_new_tokens": 8},
        {"image": None, "prompt": "Cat?", "max_new_tokens": 6},
    ]
    out = []
    for name, path in bundles.items():
        pipe = Recording.from_bundle(path, threads=1)
        runs = [pipe.greedy(c) for c in cases]
        out.append(
            {
                "name": name,
                "bundle": path,
                "cases": cases,
                "x86": [r[0] for r in runs],
                "margins": [r[1] for r in runs],
            }
        )
    return d, out


class Recording(VLMPipeline):
    """The pipeline, keeping each step's logits: how far x86's greedy choice was from a tie."""

    def step(self, frame, cache):
        logits = super().step(frame, cache)
        self.seen.append(logits[0].copy())
        return logits

    def greedy(self, case: dict) -> tuple[list[int], list[float]]:
        """(the greedy answer's ids, at each step the top-1 logit's margin over the second)."""
        self.seen = []
        ids = greedy_ids(self, case)
        top2 = [np.sort(x)[-2:] for x in self.seen[: len(ids)]]
        return ids, [float(b - a) for a, b in top2]


def run_check(cpu: str, items: list[dict], where) -> dict:
    plan_path, out_path = where / f"plan-{cpu}.json", where / f"out-{cpu}.json"
    plan_path.write_text(json.dumps([{"bundle": i["bundle"], "cases": i["cases"]} for i in items]))
    r = subprocess.run(
        [*arm_python(cpu), os.path.join(HERE, "arm64_check.py"), str(plan_path), str(out_path)],
        env=arm_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(out_path.read_text())


@pytest.mark.parametrize("cpu", CPUS)
def test_every_bundle_kind_answers_as_on_x86_within_its_gates(plan, cpu, tmp_path):
    _, items = plan
    got = run_check(cpu, items, tmp_path)
    assert got["machine"] == "aarch64"
    report, ties = [], []
    for item, result in zip(items, got["bundles"], strict=True):
        report.append((item["name"], result["summary"].get("kl_mean"), result["failures"], result["seconds"]))
        for arm, x86, margins in zip(result["answers"], item["x86"], item["margins"], strict=True):
            # the same greedy tokens, up to a step where x86's own choice was a near-tie: there
            # another CPU's rounding (int8/int4 kernels differ by ISA) may pick the other token
            k = next((i for i, (a, b) in enumerate(zip(arm, x86, strict=False)) if a != b), None)
            if k is None:
                assert len(arm) == len(x86), (cpu, item["name"], arm, x86)
            else:
                assert margins[k] < TIE, (cpu, item["name"], k, margins[k], arm, x86)
                ties.append(f"{item['name']} at token {k} (x86 margin {margins[k]:.4f})")
        # KL and vision cosine gate here: top-1 and exact match trip on this random model's near-tied logits
        # on x86 too (their gates are meant for trained models)
        assert result["kl_failures"] == [], (cpu, item["name"], result["kl_failures"])
    print("\n" + "\n".join(f"{cpu} {n}: KL vs PyTorch {kl:.2e}, {s} s" for n, kl, _, s in report))
    print(f"{cpu}: answers equal x86's token for token, but at near-ties: {ties or 'none'}")


def test_a_broken_int8_zero_point_fails_the_tier(plan, tmp_path):
    """The tier's own negative control: an int8-static bundle whose zero points are shifted (and
    re-hashed, so it loads) fails its gates or its answers on the emulated CPU."""
    import onnx
    from onnx import numpy_helper

    from core.bundle import load_bundle

    _, items = plan
    item = next(i for i in items if i["name"] == "tiny int8-static")
    broken = tmp_path / "broken"
    shutil.copytree(item["bundle"], broken)
    path = str(broken / "decoder.onnx")
    model = onnx.load(path)
    zero_points = {
        n.input[2] for n in model.graph.node if n.op_type == "DequantizeLinear" and len(n.input) > 2
    }
    shifted = 0
    for init in model.graph.initializer:
        if init.name in zero_points:
            zp = numpy_helper.to_array(init)
            if zp.dtype in (np.int8, np.uint8):
                moved = (zp.astype(np.int16) + 40).clip(-128, 127).astype(zp.dtype)
                init.CopyFrom(numpy_helper.from_array(moved, init.name))
                shifted += 1
    assert shifted, "no int8 zero point found in the int8-static decoder"
    onnx.save(model, path)
    bundle = load_bundle(str(broken), verify=False)
    bundle.manifest.write(str(broken))  # hashes match: only the numbers are wrong
    got = run_check("cortex-a76", [dict(item, bundle=str(broken))], tmp_path)["bundles"][0]
    assert got["kl_failures"] or got["answers"] != item["x86"], got  # what the main check would fail on


def test_serve_answers_the_openai_client_from_there(plan):
    import openai

    _, items = plan
    item = next(i for i in items if i["name"] == "smolvlm fp32 fused")  # fp32: exactly as alone
    port = free_port()
    cmd = [*arm_python("cortex-a76"), "-m", "cli.main", "serve", item["bundle"], "--port", str(port)]
    env_before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = SITE  # the child server inherits it: the aarch64 packages only
    try:
        with ChildServer(cmd, f"http://127.0.0.1:{port}/health", "arm64 server", timeout=600) as s:
            c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=300)
            r = c.chat.completions.create(
                model="x", messages=[{"role": "user", "content": "Cat?"}], max_tokens=6
            )
            expected = VLMPipeline.from_bundle(item["bundle"]).generate([], "Cat?", max_new_tokens=6)
            assert r.choices[0].message.content == expected, s.output()[-2000:]
    finally:
        if env_before is None:
            os.environ.pop("PYTHONPATH")
        else:
            os.environ["PYTHONPATH"] = env_before
