"""The the_cauldron / FineVision adapter, on a local parquet dataset with real photographs."""

import io
from itertools import islice

import pytest
from PIL import Image

from core.conversations import HFConversations, record_to_conversation
from nanovlm.collator import Collator
from nanovlm.tiny import build_tokenizer, tiny_config

datasets = pytest.importorskip("datasets")
skimage_data = pytest.importorskip("skimage.data")


def _png(arr) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def cauldron_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cauldron")
    records = {
        "images": [
            [{"bytes": _png(skimage_data.astronaut()[::8, ::8]), "path": None}],
            [],
            [{"bytes": b"garbage", "path": None}],
            [{"bytes": _png(skimage_data.coffee()[::8, ::8]), "path": None}],
        ],
        "texts": [
            [{"user": "Who is this?", "assistant": "an astronaut", "source": "x"}],
            [{"user": "No image here?", "assistant": "yes", "source": "x"}],
            [{"user": "Broken?", "assistant": "yes", "source": "x"}],
            [{"user": "What is in the cup?", "assistant": "", "source": "x"}],
        ],
    }
    features = datasets.Features(
        {
            "images": datasets.Sequence(datasets.Image()),
            "texts": [
                {
                    "user": datasets.Value("string"),
                    "assistant": datasets.Value("string"),
                    "source": datasets.Value("string"),
                }
            ],
        }
    )
    datasets.Dataset.from_dict(records, features=features).to_parquet(str(d / "train.parquet"))
    return str(d)


@pytest.mark.parametrize("streaming", [False, True])
def test_cauldron_records_become_conversations(cauldron_dir, streaming):
    src = HFConversations(cauldron_dir, None, "train", streaming=streaming)
    convs = list(islice(src.iterate(0, 0, 1), 4))
    assert convs[0].turns == [("Who is this?", "an astronaut")] and len(convs[0].images) == 1
    assert convs[1].images == []
    cfg = tiny_config()
    col = Collator(cfg, build_tokenizer(cfg), max_length=128)
    batch = col(convs)
    assert batch["input_ids"].shape[0] == 1  # only the astronaut survives
    assert col.skipped == {"too_long": 0, "bad_image": 1, "no_image": 1, "no_answer": 1}


def test_sharding_across_ranks(cauldron_dir):
    src = HFConversations(cauldron_dir, None, "train", streaming=True)
    r0 = [c.turns for c in islice(src.iterate(0, 0, 2), 2)]
    r1 = [c.turns for c in islice(src.iterate(0, 1, 2), 2)]
    assert r0[0][0][0] == "Who is this?" and r1[0][0][0] == "No image here?"
    assert r0[1][0][0] == "Broken?"


def test_messages_style_record():
    conv = record_to_conversation(
        {
            "images": [Image.new("RGB", (4, 4))],
            "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "black"}]},
            ],
        }
    )
    assert conv.turns == [("Colour?", "black")] and len(conv.images) == 1
