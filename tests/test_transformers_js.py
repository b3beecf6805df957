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
        r = subprocess.run(
            [NPM, "install", "--no-audit", "--no-fund", f"@huggingface/transformers@{TRANSFORMERS_JS}"],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert r.returncode == 0, r.stderr[-3000:]
    return root


def test_transformers_js_answers_like_our_runtime(node_modules, tmp_path):
    from export.onnx_export import export_onnx
    from tests.test_idefics3 import write_idefics3
    from transformers_js.layout import export_transformers_js

    ckpt, bundle, layout = tmp_path / "ckpt", tmp_path / "bundle", tmp_path / "smolvlm-tiny"
    write_idefics3(ckpt, tie=False, layers=4)  # blocks 1 and 2 get 4-bit layers in the q4 variant
    export_onnx(str(ckpt), str(bundle))
    export_transformers_js(str(ckpt), str(layout))
    pipe = VLMPipeline.from_bundle(str(bundle))
    question = "How many circles?"
    pictures = [
        Image.fromarray(skimage_data.chelsea()).resize((100, 40)),  # split into 4 x 2 tiles + global
        Image.fromarray(skimage_data.coffee()).resize((24, 20)),
        None,
    ]
    cases, ours = [], []
    for picture in pictures:
        images = [picture] if picture is not None else []
        batch = pipe.prepare([images], [question])
        ours.append([int(t[0]) for t in pipe.generate_ids(batch, GenerationRequest(12))])
        case = {
            "input_ids": batch.input_ids[0].tolist(),
            "max_new_tokens": 12,
            "pixel_values": None,
            "pixel_shape": None,
            "messages": None,
        }
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
    eos = pipe.tokenizer.eos_token_id
    cut = lambda t: t[: t.index(eos) + 1] if eos in t else t  # noqa: E731
    got = _node(script, layout, tmp_path / "cases.json", "fp32")
    for mine, theirs in zip(ours, got, strict=True):
        assert cut(theirs["tokens"]) == cut(mine)
    assert len({tuple(o) for o in ours}) == 3 and all(len(set(o)) > 1 for o in ours)
    assert got[2]["processor_input_ids"] == cases[2]["input_ids"]  # its tokenizer and chat template: our ids
    # the quantized variants, under the names transformers.js reads for dtype q4 / q8: its greedy
    # tokens equal a plain ONNX Runtime loop over the same files
    import onnx
    from onnx import helper

    from transformers_js.variants import SUFFIXES

    q4 = onnx.load(str(layout / "onnx" / "decoder_model_merged_q4.onnx"))
    bits = [
        helper.get_attribute_value(a)
        for n in q4.graph.node
        if n.op_type == "MatMulNBits"
        for a in n.attribute
        if a.name == "bits"
    ]
    assert bits.count(4) >= 4 and 8 in bits
    image_id = pipe.cfg.image_token_id
    for dtype, suffix in SUFFIXES.items():
        theirs = _node(script, layout, tmp_path / "cases.json", dtype)
        for case, t in zip(cases, theirs, strict=True):
            assert cut(t["tokens"]) == cut(_ort_greedy(layout, suffix, case, image_id, eos))


def _node(script, layout, cases, dtype: str) -> list[dict]:
    r = subprocess.run(
        [NODE, script, str(layout), str(cases), dtype], capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def _ort_greedy(layout, suffix: str, case: dict, image_id: int, eos: int) -> list[int]:
    """Greedy decoding over the layout's three graphs with onnxruntime, as their IO says."""
    import numpy as np
    import onnxruntime as ort

    s = {
        g: ort.InferenceSession(
            str(layout / "onnx" / f"{g}{suffix}.onnx"), providers=["CPUExecutionProvider"]
        )
        for g in ("vision_encoder", "embed_tokens", "decoder_model_merged")
    }
    ids = np.array([case["input_ids"]], np.int64)
    x = s["embed_tokens"].run(None, {"input_ids": ids})[0]
    if case["pixel_values"] is not None:
        pixels = np.array(case["pixel_values"], np.float32).reshape(case["pixel_shape"])
        feats = s["vision_encoder"].run(None, {"pixel_values": pixels})[0]
        x[0, ids[0] == image_id] = feats.reshape(-1, x.shape[-1])
    dec = s["decoder_model_merged"]
    past = {
        i.name: np.zeros([1, i.shape[1], 0, i.shape[3]], np.float32)
        for i in dec.get_inputs()
        if i.name.startswith("past_key_values.")
    }
    total, out = ids.shape[1], []
    for _ in range(case["max_new_tokens"]):
        n = x.shape[1]
        feed = {
            "inputs_embeds": x,
            "attention_mask": np.ones((1, total), np.int64),
            "position_ids": np.arange(total - n, total, dtype=np.int64)[None],
            **past,
        }
        logits, *presents = dec.run(None, feed)
        token = int(logits[0, -1].argmax())
        out.append(token)
        if token == eos:
            break
        past = {
            name.replace("present", "past_key_values"): v
            for name, v in zip([o.name for o in dec.get_outputs()[1:]], presents, strict=True)
        }
        x = s["embed_tokens"].run(None, {"input_ids": np.array([[token]], np.int64)})[0]
        total += 1
    return out
