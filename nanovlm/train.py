"""The training loop: one CPU, one GPU, or `torchrun --nproc_per_node N` (DDP; gloo on CPU, NCCL on GPU).

Checkpoints go to OUTPUT_DIR/checkpoint: a complete nanoVLM checkpoint (config, weights, tokenizer)
plus train_state.pt (optimizer, scheduler, step, data position, RNG). They are written to a temp
directory and renamed into place, so a run killed at any moment leaves the previous checkpoint
intact and loses at most the steps since it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from collections.abc import Iterator
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from core.config import VLMConfig
from core.conversations import Conversation
from core.files import atomic_write, check_target
from core.processors import ImageProcessor, Tokenizer, prepare_batch
from core.shapes_dataset import QUESTION_TYPES, ShapesDataset, scene_questions, split_blind_baseline

from .checkpoint import load_training_state, save_training_state
from .collator import Collator
from .train_config import TrainConfig
from .train_history import append_history, plot_history, read_history, write_history
from .vision_language_model import VisionLanguageModel

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- setup
def dist_info() -> tuple[int, int]:
    """(rank, world size); starts the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def is_training_run(path: str) -> bool:
    """Whether `path` holds an earlier run's output (its train_config.json is written first)."""
    return os.path.exists(os.path.join(path, "train_config.json"))


def build_model(tc: TrainConfig) -> VisionLanguageModel:
    """The model named by tc.model: the built-in tiny default, a checkpoint, or a VLMConfig JSON."""
    if tc.model == "tiny":
        from .tiny import build_tokenizer, tiny_config

        torch.manual_seed(tc.seed)
        cfg = tiny_config()
        return VisionLanguageModel(cfg, load_backbone=False, tokenizer=build_tokenizer(cfg, tc.seed))
    if os.path.isdir(tc.model):
        return VisionLanguageModel.from_pretrained(tc.model)
    if tc.model.endswith(".json"):
        torch.manual_seed(tc.seed)
        cfg = VLMConfig.load(tc.model)
        model = VisionLanguageModel(cfg, load_backbone=cfg.vlm_load_backbone_weights)
        model.tokenizer = Tokenizer.of_checkpoint(os.path.dirname(tc.model), cfg)
        return model
    raise ValueError(f"model={tc.model!r}: expected 'tiny', a checkpoint directory or a VLMConfig .json file")


def param_groups(model: VisionLanguageModel, tc: TrainConfig) -> list[dict[str, Any]]:
    """AdamW groups per part; a learning rate of 0 freezes that part (no grads, no optimizer state)."""
    groups = []
    for name, module, lr in (
        ("mp", model.MP, tc.lr_mp),
        ("vision", model.vision_encoder, tc.lr_vision_backbone),
        ("language", model.decoder, tc.lr_language_backbone),
    ):
        params = list(module.parameters())
        for p in params:
            p.requires_grad_(lr > 0)
        if lr > 0:
            groups.append({"name": name, "params": params, "lr": lr})
    if not groups:
        raise ValueError("every learning rate is 0: nothing to train")
    return groups


def lr_lambda(tc: TrainConfig):
    warmup = max(1, int(tc.warmup_ratio * tc.max_training_steps))

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, tc.max_training_steps - warmup))
        return tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def autocast_for(tc: TrainConfig, device: torch.device):
    use = tc.mixed_precision == "bf16" or (
        tc.mixed_precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
    )
    if tc.mixed_precision not in ("auto", "bf16", "no"):
        raise ValueError(f"mixed_precision={tc.mixed_precision!r}: expected auto, bf16 or no")
    return (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use else nullcontext


# ----------------------------------------------------------------------------- data
def conversations(tc: TrainConfig, start: int, rank: int, world: int) -> Iterator[Conversation]:
    """This rank's training samples from its `start`-th on: rank r takes samples r, r+world, ..."""
    if tc.dataset == "shapes":
        ds = ShapesDataset(
            tc.dataset_split, seed=tc.seed, image_size=tc.shapes_image_size, length=tc.shapes_length
        )
        k = start
        while True:
            i = (k * world + rank) % len(ds)
            if tc.shapes_all_questions:
                image, qa = scene_questions(ds, i)
                yield Conversation([image], qa)
            else:
                s = ds[i]
                yield Conversation([s.image], [(s.question, s.answer)])
            k += 1
    if tc.dataset.startswith("hf:"):
        from core.conversations import HFConversations

        name, _, subset = tc.dataset[3:].partition(":")
        yield from HFConversations(name, subset or None, tc.dataset_split, tc.streaming).iterate(
            start, rank, world
        )
        return
    raise ValueError(f"dataset={tc.dataset!r}: expected 'shapes' or 'hf:NAME[:SUBSET]'")


def dataset_length(tc: TrainConfig) -> int:
    return tc.shapes_length if tc.dataset == "shapes" else 0


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(
    model: VisionLanguageModel,
    tc: TrainConfig,
    collator: Collator,
    split: str = "validation",
    n: int | None = None,
    max_new_tokens: int = 8,
) -> dict:
    """Loss and exact-match accuracy of greedy answers on a split of the built-in data."""
    model.eval()
    device = next(model.parameters()).device
    n = n or tc.eval_samples
    ds = ShapesDataset(split, seed=tc.seed, image_size=tc.shapes_image_size)
    samples = [ds[i] for i in range(n)]
    losses, correct = [], {q: [0, 0] for q in QUESTION_TYPES}
    proc = collator.image_processor
    for i in range(0, n, 48):
        chunk = samples[i : i + 48]
        batch = collator([Conversation([s.image], [(s.question, s.answer)]) for s in chunk])
        batch = {k: v.to(device) for k, v in batch.items()}
        _, loss = model(batch["input_ids"], batch["images"], batch["attention_mask"], batch["labels"])
        losses.append(loss.item())
        answers = answer(
            model,
            model.tokenizer,
            proc,
            [[s.image] for s in chunk],
            [s.question for s in chunk],
            max_new_tokens,
        )
        for s, a in zip(chunk, answers, strict=True):
            correct[s.qtype][0] += a.strip() == s.answer
            correct[s.qtype][1] += 1
    model.train()
    per_type = {q: c / t for q, (c, t) in correct.items() if t}
    return {
        "val_loss": float(np.mean(losses)),
        "accuracy": sum(c for c, _ in correct.values()) / n,
        "accuracy_by_type": per_type,
    }


def answer(
    model: VisionLanguageModel,
    tokenizer: Tokenizer,
    proc: ImageProcessor,
    images: list[list[Any]],
    questions: list[str],
    max_new_tokens: int = 16,
) -> list[str]:
    """Greedy answers for a batch of questions: the same input path as the runtime."""
    batch = prepare_batch(model.cfg, tokenizer, proc, images, questions)
    device = next(model.parameters()).device
    out = model.generate(
        torch.from_numpy(batch.input_ids).to(device),
        torch.from_numpy(batch.pixel_values).to(device),
        attention_mask=torch.from_numpy(batch.attention_mask).to(device),
        max_new_tokens=max_new_tokens,
        eos_token_id=tokenizer.eos_token_id,
    )
    return [tokenizer.decode(row.tolist()) for row in out]


# ----------------------------------------------------------------------------- the loop
def backward_accumulated(forward, micro: list[dict], ddp=None, autocast=nullcontext) -> float:
    """Backward over k micro-batches -> mean loss per label token of the whole accumulated batch.

    Each micro-batch's mean loss is weighted by its share of the label tokens, so k micro-batches
    give the gradient of one k-times larger batch. DDP syncs gradients on the last one only.
    """
    n_total = max(1, sum(int((b["labels"] != -100).sum()) for b in micro))
    loss_sum = 0.0
    for i, b in enumerate(micro):
        sync = ddp.no_sync() if ddp is not None and i < len(micro) - 1 else nullcontext()
        with sync:
            with autocast():
                _, loss = forward(b["input_ids"], b["images"], b["attention_mask"], b["labels"])
            scaled = loss.float() * int((b["labels"] != -100).sum()) / n_total
            scaled.backward()
        loss_sum += scaled.item()
    return loss_sum


def train(tc: TrainConfig, stop_after: int | None = None) -> dict:
    """Run (or resume) training; `stop_after` ends this run early after that step, as a kill would."""
    rank, world = dist_info()
    device = torch.device(
        f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    )
    if rank == 0 and not tc.resume:
        check_target(
            tc.output_dir, is_training_run, "training run", tc.overwrite, also="or --resume to continue it"
        )
    random.seed(tc.seed)
    model = build_model(tc).to(device)
    if model.tokenizer is None:
        raise ValueError(f"model {tc.model!r} has no tokenizer: training needs one")
    model.train()
    optimizer = torch.optim.AdamW(param_groups(model, tc), weight_decay=tc.weight_decay, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(tc))
    step, consumed = (
        load_training_state(model, optimizer, scheduler, os.path.join(tc.output_dir, "checkpoint"))
        if tc.resume
        else (0, 0)
    )
    collator = Collator(model.cfg, model.tokenizer, tc.max_sample_length)
    autocast = autocast_for(tc, device)

    ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else None
    forward = ddp or model
    if tc.compile:
        forward = torch.compile(forward)

    os.makedirs(tc.output_dir, exist_ok=True)
    log_path = os.path.join(tc.output_dir, "metrics.jsonl")
    history = read_history(log_path, upto=step) if rank == 0 else []
    if rank == 0:
        tc.save(os.path.join(tc.output_dir, "train_config.json"))
        write_history(log_path, history)  # drop entries past the checkpoint we resumed from

    per_epoch = dataset_length(tc) // max(1, tc.batch_size * world * tc.gradient_accumulation_steps)
    max_steps = tc.max_training_steps
    if tc.max_epochs and per_epoch:
        max_steps = min(max_steps, int(tc.max_epochs * per_epoch))
    stream = conversations(tc, consumed, rank, world)
    if rank == 0 and not tc.target_accuracy:
        log.info(
            "no target_accuracy: all %d steps will run (-o target_accuracy=0.99 stops at the demo's target)",
            max_steps,
        )
    bar = _progress(rank, max_steps, step)
    if rank == 0 and step == 0 and tc.eval_samples:  # the starting point of the curves
        metrics = {"step": 0, **evaluate(model, tc, collator)}
        history.append(metrics)
        append_history(log_path, metrics)
    t0, tokens_seen, stopped = time.time(), 0, None
    started_at = step
    first_estimate = step + min(20, max(1, (max_steps - step) // 10))
    while step < max_steps:
        micro = []
        while len(micro) < tc.gradient_accumulation_steps:
            samples = [next(stream) for _ in range(tc.batch_size)]
            consumed += tc.batch_size
            batch = collator(samples)
            if batch is not None:
                micro.append({k: v.to(device) for k, v in batch.items()})
        loss_sum = backward_accumulated(forward, micro, ddp, autocast)
        tokens_seen += sum(int(b["attention_mask"].sum()) for b in micro)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if rank == 0 and step == first_estimate:  # once the first steps' pace is known
            pace = (time.time() - t0) / (step - started_at)
            log.info(
                "about %.0f min for the %d steps left at this pace",
                pace * (max_steps - step) / 60,
                max_steps - step,
            )
        if rank == 0:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum:.3f}")
            if step % tc.log_interval == 0 or step == max_steps:
                entry = {
                    "step": step,
                    "loss": loss_sum,
                    "lr": scheduler.get_last_lr()[0],
                    "grad_norm": float(grad_norm),
                    "tokens_per_s": tokens_seen / (time.time() - t0),
                    "elapsed_s": time.time() - t0,
                }
                history.append(entry)
                append_history(log_path, entry)
        is_eval = tc.eval_interval and step % tc.eval_interval == 0 or step == max_steps
        if is_eval and rank == 0 and tc.eval_samples:
            metrics = {"step": step, **evaluate(model, tc, collator)}
            history.append(metrics)
            append_history(log_path, metrics)
            log.info("step %d: val_loss %.4f accuracy %.3f", step, metrics["val_loss"], metrics["accuracy"])
            if tc.target_accuracy and metrics["accuracy"] >= tc.target_accuracy and step < max_steps:
                stopped = {
                    "step": step,
                    "reason": f"validation accuracy {metrics['accuracy']:.3f} reached the "
                    f"target {tc.target_accuracy} (of {max_steps} scheduled steps)",
                }
                log.info("stopping early at step %d: %s", step, stopped["reason"])
        if world > 1:  # every rank stops at the step rank 0 decided
            flag = torch.tensor([1 if stopped else 0], device=device)
            dist.broadcast(flag, 0)
            stopped = stopped or ({"step": step, "reason": "rank 0 stopped early"} if flag.item() else None)
        if rank == 0 and (step % tc.checkpoint_interval == 0 or step == max_steps or stopped):
            save_training_state(model, optimizer, scheduler, step, consumed, tc)
        if world > 1:
            dist.barrier()
        if stopped or (stop_after is not None and step >= stop_after):
            break
    if rank == 0:
        bar.close()
        summary = _summary(history, tc, collator) | ({"stopped_early": stopped} if stopped else {})
        with atomic_write(os.path.join(tc.output_dir, "summary.json")) as f:
            json.dump(summary, f, indent=2)
        plot_history(
            history, os.path.join(tc.output_dir, "training_curves.png"), summary.get("blind_baseline")
        )
    else:
        summary = {}
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return summary


def _summary(history: list[dict], tc: TrainConfig, collator: Collator) -> dict:
    evals = [h for h in history if "accuracy" in h]
    out = {"steps": max((h["step"] for h in history), default=0), "skipped_samples": collator.skipped}
    if evals:
        out |= {
            "final_val_loss": evals[-1]["val_loss"],
            "final_accuracy": evals[-1]["accuracy"],
            "accuracy_by_type": evals[-1]["accuracy_by_type"],
        }
    train_hist = [h for h in history if "elapsed_s" in h]
    if train_hist:
        out["train_seconds"] = train_hist[-1]["elapsed_s"]
    if tc.dataset == "shapes" and tc.eval_samples:
        out["blind_baseline"] = split_blind_baseline("validation", tc.eval_samples, tc.seed)
    return out


def _progress(rank: int, total: int, initial: int):
    from core.progress import progress

    return progress(total=total, initial=initial, desc="train", unit="step", disable=rank != 0)
