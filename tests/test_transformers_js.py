"""The transformers.js layout run by transformers.js itself: Node (Debian's nodejs) with the pinned
@huggingface/transformers from npm, local files only, must produce our runtime's greedy tokens."""

import json
import os
import shutil
import subprocess

import pytest
from PIL import Image

from runtime.pipeline import GenerationRequest, VLMPipeline
from tests.conftest import CACHE, REPO

skimage_data = pytest.importorskip("skimage.data")
pytest.importorskip("transformers")

TRANSFORMERS_JS = "4.3.2"
NODE, NPM = shutil.which("node"), shutil.which("npm")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (NODE and NPM),
        reason="needs Debian's nodejs and npm (apt-get install nodejs npm; CI installs them)",
    ),
]


@pytest.fixture(scope="module")
def node_modules() -> str:
    """@huggingface/transformers@4.3.2 installed once under .cache (onnxruntime-node's optional
    CUDA download skipped: its CPU binaries ship in the npm package)."""
    root = os.path.join(CACHE, f"transformers-js-{TRANSFORMERS_JS}")
    if not os.path.exists(os.path.join(root, "node_modules", "@huggingface", "transformers", "package.json")):
        os.makedirs(root, exist_ok=True)
        with open(os.path.join(root, "package.json"), "w") as f:
            json.dump({"name": "nanovlm-transformers-js-test", "private": True, "type": "module"}, f)
        env = {**os.environ, "ONNXRUNTIME_NODE_INSTALL": "skip"}
        r = subprocess.run([NPM, "install", "--no-audit", "--no-fund", f"@huggingface/transformers@{TRANSFORMERS_JS}"],
                           cwd=root, env=env, capture_output=True, text=True, timeout=900)  # fmt: skip
        assert r.returncode == 0, r.stderr[-3000:]
    return root


def test_transformers_js_answers_like_our_runtime(node_modules, tmp_path):
    from export.onnx_export import export_onnx
    from export.transformers_js import export_transformers_js
    from tests.test_idefics3 import write_idefics3

    ckpt, bundle, layout = tmp_path / "ckpt", tmp_path / "bundle", tmp_path / "smolvlm-tiny"
    write_idefics3(ckpt, tie=False)
    export_onnx(str(ckpt), str(bundle))
    export_transformers_js(str(ckpt), str(layout))
    pipe = VLMPipeline.from_bundle(str(bundle))
    question = "How many circles?"
    pictures = [Image.fromarray(skimage_data.chelsea()).resize((100, 40)),  # split into 4 x 2 tiles + global
                Image.fromarray(skimage_data.coffee()).resize((24, 20)), None]  # fmt: skip
    cases, ours = [], []
    for picture in pictures:
        images = [picture] if picture is not None else []
        batch = pipe.prepare([images], [question])
        ours.append([int(t[0]) for t in pipe.generate_ids(batch, GenerationRequest(12))])
        case = {"input_ids": batch.input_ids[0].tolist(), "max_new_tokens": 12, "pixel_values": None,
                "pixel_shape": None, "messages": None}  # fmt: skip
        if images:
            case |= {
                "pixel_values": batch.pixel_values.ravel().tolist(),
                "pixel_shape": [1, *batch.pixel_values.shape],
            }
        else:
            case["messages"] = [{"role": "user", "content": [{"type": "text", "text": question}]}]
        cases.append(case)
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    script = os.path.join(node_modules, "idefics3_generate.mjs")  # next to node_modules, so imports resolve
    shutil.copy2(os.path.join(REPO, "tests", "js", "idefics3_generate.mjs"), script)
    r = subprocess.run([NODE, script, str(layout), str(tmp_path / "cases.json")], capture_output=True, text=True,
                       timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    eos = pipe.tokenizer.eos_token_id
    for mine, theirs in zip(ours, got, strict=True):
        mine = mine[: mine.index(eos) + 1] if eos in mine else mine
        assert theirs["tokens"][: len(mine)] == mine
    assert len({tuple(o) for o in ours}) == 3 and all(len(set(o)) > 1 for o in ours)
    assert got[2]["processor_input_ids"] == cases[2]["input_ids"]  # its tokenizer and chat template: our ids
