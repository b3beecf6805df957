import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from core.processors import format_prompt
from core.shapes_dataset import QUESTION_TYPES, ShapesDataset, blind_baseline
from nanovlm.collator import Collator, Conversation, encode_conversation
from nanovlm.tiny import build_tokenizer, tiny_config
from nanovlm.train import backward_accumulated, conversations, lr_lambda, train
from nanovlm.train_config import TrainConfig
from nanovlm.vision_language_model import VisionLanguageModel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_config()
    return cfg, build_tokenizer(cfg)


def _conv(i=0, split="train"):
    s = ShapesDataset(split)[i]
    return Conversation([s.image], [(s.question, s.answer)])


# ----------------------------------------------------------------------------- data
def test_dataset_is_deterministic_balanced_and_split():
    a, b = ShapesDataset("train", seed=1), ShapesDataset("train", seed=1)
    assert a[5].question == b[5].question and np.array_equal(np.asarray(a[5].image), np.asarray(b[5].image))
    assert (
        a[5].question != ShapesDataset("test", seed=1)[5].question
        or a[5].answer != ShapesDataset("test", seed=1)[5].answer
    )
    samples = [a[i] for i in range(600)]
    assert {s.qtype for s in samples} == set(QUESTION_TYPES)
    counts = [s.answer for s in samples if s.qtype == "count"]
    assert sorted(set(counts)) == ["1", "2", "3", "4", "5", "6"]
    yes = [s.answer for s in samples if s.qtype in ("left", "above")]
    assert 0.4 < yes.count("yes") / len(yes) < 0.6
    test = [ShapesDataset("test")[i] for i in range(600)]
    assert blind_baseline(test, samples) <= 0.40


def test_scene_questions_cover_the_types_and_agree_with_the_image():
    from core.shapes_dataset import scene_questions

    ds = ShapesDataset("train")
    for i in range(50):
        image, qa = scene_questions(ds, i)
        questions = [q for q, _ in qa]
        n = int(dict(qa)["How many objects are there?"])
        assert 1 <= n <= 6 and len(set(questions)) == len(questions)
        assert len(questions) == len(QUESTION_TYPES)
        # the image really holds n separate objects: count non-background connected blobs per cell
        arr = np.asarray(image.resize((64, 64), Image.NEAREST)).astype(int)
        cells = arr.reshape(4, 16, 4, 16, 3).transpose(0, 2, 1, 3, 4).reshape(16, -1, 3)
        occupied = sum(int((np.abs(c - [20, 20, 24]).sum(-1) > 60).sum() > 4) for c in cells)
        assert occupied == n, (i, qa)


def test_answers_agree_with_the_scene_and_the_image():
    """Every question is about the one clearly largest object; its answers match that object and
    the pixels drawn for it, in the training chats and in the test split alike."""
    from core.shapes_dataset import COLOURS, QUESTIONS, render, scene

    ds = ShapesDataset("train")
    for i in range(200):
        objects, qa = scene(ds, i)
        assert sorted(q for q, _ in qa) == sorted(QUESTIONS.values())
        largest = max(objects, key=lambda o: o.r)
        assert sum(o.r == largest.r for o in objects) == 1
        assert all(o.r <= 0.085 for o in objects if o is not largest)
        d = dict(qa)
        assert d[QUESTIONS["colour"]] == largest.colour and d[QUESTIONS["shape"]] == largest.shape
        assert d[QUESTIONS["left"]] == ("yes" if largest.x < 0.5 else "no")
        assert d[QUESTIONS["above"]] == ("yes" if largest.y < 0.5 else "no")
        assert abs(largest.x - 0.5) > 0.1 and abs(largest.y - 0.5) > 0.1  # never on the middle line
        pixel = render(objects, 128).getpixel((int(largest.x * 128), int(largest.y * 128)))
        assert pixel == COLOURS[largest.colour]
    test = ShapesDataset("test")
    for i in range(50):
        s = test[i]
        assert s.question == QUESTIONS[s.qtype]


def test_collator_labels_only_assistant_tokens(tiny):
    cfg, tok = tiny
    col = Collator(cfg, tok, max_length=128)
    batch = col([_conv(0), _conv(3)])
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert batch["images"].shape == (2, 3, 128, 128)
    for row in range(2):
        learnt = [(t, int(labels[row, t])) for t in range(ids.shape[1]) if labels[row, t] != -100]
        # labels are next-token targets and hit exactly the answer and its <|im_end|>
        assert all(int(ids[row, t + 1]) == lab for t, lab in learnt)
        answer_ids = [lab for _, lab in learnt]
        assert answer_ids[-1] == tok.eos_token_id
        assert tok.decode(answer_ids[:-1]) == ShapesDataset("train")[[0, 3][row]].answer
    # left padding: the shorter row starts with pad and masked positions carry no labels
    assert (labels[mask == 0] == -100).all()
    assert mask[:, -1].all()


def test_training_prompt_equals_inference_prompt(tiny):
    cfg, tok = tiny
    s = ShapesDataset("train")[2]
    ids, learn = encode_conversation(cfg, tok, [(1, 1)], [(s.question, s.answer)])
    prompt_ids = tok.encode(format_prompt(cfg, s.question, [(1, 1)]))
    assert ids[: len(prompt_ids)] == prompt_ids and not any(learn[: len(prompt_ids)])


def test_collator_skips_and_counts_bad_samples(tiny, tmp_path):
    cfg, tok = tiny
    col = Collator(cfg, tok, max_length=40)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    good = _conv(0)
    batch = col(
        [
            good,
            Conversation([], [("q?", "a")]),
            Conversation([str(tmp_path / "broken.png")], [("q?", "a")]),
            Conversation([Image.new("RGB", (8, 8))], [("q?", "")]),
            Conversation([Image.new("RGB", (8, 8))], [("a very long question " * 20, "a")]),
        ]
    )
    assert batch["input_ids"].shape[0] == 1
    assert col.skipped == {"too_long": 1, "bad_image": 1, "no_image": 1, "no_answer": 1}


def _keys(stream, n):
    from itertools import islice

    return [c.turns[0][0] + str(np.asarray(c.images[0]).sum()) for c in islice(stream, n)]


def test_ranks_see_distinct_shards():
    tc = TrainConfig()
    r0, r1 = _keys(conversations(tc, 0, 0, 2), 30), _keys(conversations(tc, 0, 1, 2), 30)
    assert not set(r0) & set(r1)
    assert _keys(conversations(tc, 10, 0, 2), 20) == r0[10:]


# ----------------------------------------------------------------------------- config
def test_train_config_round_trip_and_overrides(tmp_path):
    tc = TrainConfig().override(["batch_size=7", "lr_mp=1e-4", "resume=true", "output_dir=/x"])
    assert (tc.batch_size, tc.lr_mp, tc.resume, tc.output_dir) == (7, 1e-4, True, "/x")
    tc.save(tmp_path / "t.json")
    assert TrainConfig.load(tmp_path / "t.json") == tc
    with pytest.raises(ValueError, match="unknown train config key 'bach_size'"):
        TrainConfig().override(["bach_size=3"])
    (tmp_path / "bad.json").write_text(json.dumps({"batch_size": 2, "lr_typo": 1}))
    with pytest.raises(ValueError, match="unknown key\\(s\\) lr_typo"):
        TrainConfig.load(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="batch_size='x' is not a valid int"):
        TrainConfig().override(["batch_size=x"])


def test_schedule_warmup_then_cosine():
    tc = TrainConfig(max_training_steps=100, warmup_ratio=0.1, min_lr_ratio=0.1)
    f = lr_lambda(tc)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.1 + 0.9 * 0.5)
    assert f(100) == pytest.approx(0.1)
    assert all(f(i) >= f(i + 1) for i in range(10, 100))


def test_accumulation_equals_one_large_batch(tiny):
    cfg, tok = tiny
    col = Collator(cfg, tok, 128)
    convs = [_conv(i) for i in range(8)]

    def grads(micro):
        torch.manual_seed(0)
        m = VisionLanguageModel(cfg, load_backbone=False).train()
        loss = backward_accumulated(m, micro)
        return loss, torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None])

    l1, g1 = grads([col(convs)])
    l2, g2 = grads([col(convs[:3]), col(convs[3:])])
    assert l1 == pytest.approx(l2, rel=1e-5)
    assert torch.allclose(g1, g2, atol=1e-6, rtol=1e-4)


# ----------------------------------------------------------------------------- the loop
def _small(tmp_path, name, **kw) -> TrainConfig:
    base = dict(
        max_training_steps=4,
        batch_size=8,
        eval_interval=0,
        eval_samples=0,
        log_interval=1,
        checkpoint_interval=2,
        output_dir=str(tmp_path / name),
        warmup_ratio=0.25,
    )
    return TrainConfig(**(base | kw))


def _losses(tc: TrainConfig) -> dict[int, float]:
    rows = [json.loads(line) for line in open(os.path.join(tc.output_dir, "metrics.jsonl"))]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_resume_gives_the_same_next_losses(tmp_path):
    full = _small(tmp_path, "full")
    train(full)
    part = _small(tmp_path, "part")
    train(part, stop_after=2)  # "killed" right after the step-2 checkpoint
    assert max(_losses(part)) == 2
    train(_small(tmp_path, "part", resume=True))
    a, b = _losses(full), _losses(part)
    assert sorted(b) == [1, 2, 3, 4]
    for step in (3, 4):
        assert b[step] == pytest.approx(a[step], rel=1e-5), step
    ckpt = tmp_path / "part" / "checkpoint"
    assert VisionLanguageModel.from_pretrained(str(ckpt)).tokenizer is not None


def test_resume_with_other_architecture_is_refused(tmp_path):
    tc = _small(tmp_path, "arch", max_training_steps=2)
    train(tc)
    cfg_path = tmp_path / "arch" / "checkpoint" / "config.json"
    data = json.loads(cfg_path.read_text())
    data["lm_n_blocks"] = 3
    cfg_path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="different architecture \\(lm_n_blocks: checkpoint 3 vs run 4"):
        train(_small(tmp_path, "arch", max_training_steps=3, resume=True))


def test_short_run_lowers_the_loss(tmp_path):
    tc = _small(
        tmp_path,
        "short",
        max_training_steps=40,
        batch_size=16,
        eval_samples=48,
        eval_interval=40,
        checkpoint_interval=40,
        warmup_ratio=0.1,
        lr_mp=1e-3,
        lr_vision_backbone=1e-3,
        lr_language_backbone=1e-3,
    )
    summary = train(tc)
    losses = _losses(tc)
    assert np.mean([losses[s] for s in range(36, 41)]) < 0.6 * np.mean([losses[s] for s in range(1, 6)])
    assert summary["final_val_loss"] < losses[1]
    assert os.path.exists(tmp_path / "short" / "training_curves.png")


def test_ddp_two_cpu_processes(tmp_path):
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29517",
        "-m",
        "cli.main",
        "train",
        "-o",
        "max_training_steps=3",
        "-o",
        "batch_size=4",
        "-o",
        "eval_samples=0",
        "-o",
        "checkpoint_interval=3",
        "-o",
        f"output_dir={out}",
        "-o",
        "log_interval=1",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (out / "checkpoint" / "model.safetensors").exists()
    state = torch.load(out / "checkpoint" / "train_state.pt", weights_only=True)
    assert state["step"] == 3 and state["consumed"] == 12  # per rank: 3 steps x 4 samples
    assert len(_losses(TrainConfig(output_dir=str(out)))) == 3  # only rank 0 wrote the log


@pytest.mark.slow
def test_training_stops_once_validation_reaches_the_target(tmp_path):
    """target_accuracy: the run ends at the first evaluation at or above the target, saves its
    checkpoint there and says why; the schedule itself is unchanged (300 steps planned)."""

    tc = TrainConfig(
        max_training_steps=300,
        eval_interval=25,
        eval_samples=40,
        target_accuracy=0.25,
        checkpoint_interval=1000,
        output_dir=str(tmp_path / "run"),
    )
    summary = train(tc)
    stop = summary["stopped_early"]
    evals = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl") if '"accuracy"' in line]
    assert 0 < stop["step"] < 300 and summary["steps"] == stop["step"]
    assert evals[-1]["step"] == stop["step"] and evals[-1]["accuracy"] >= 0.25
    assert all(e["accuracy"] < 0.25 for e in evals[:-1])
    assert "reached the target 0.25 (of 300 scheduled steps)" in stop["reason"]
    state = torch.load(tmp_path / "run" / "checkpoint" / "train_state.pt", weights_only=True)
    assert state["step"] == stop["step"]
