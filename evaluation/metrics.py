"""Does a bundle say what the PyTorch model says? The comparison, without torch.

For every case (images + prompt, from the built-in test split or a folder of real images):

  vision    the bundle's image embeddings against the reference's: max abs difference, cosine per token
  decoder   teacher-forced: the bundle prefills the same prompt, then steps through the tokens the
            reference chose greedily; per step the KL divergence KL(reference || bundle) of the
            next-token distributions and whether their top-1 agree, so one early difference does
            not hide how close the rest is
  answers   each side's own greedy answer: exact match and common-prefix length; task accuracy
            where the case has a known answer (built-in data)
  ties      where the reference's top two tokens are nearly tied, a flipped top-1 is within what
            the KL gate allows: top-1 is gated on the decisive steps, exact match on the answers
            that do not part at a near tie, and the report says how many were left to KL

The reference is either the PyTorch checkpoint (evaluation/parity.py, needs torch) or the results
stored in the bundle at export (`StoredReference`: validation on a device without torch). Gates
come from the bundle's recipe (core/recipes.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from core.bundle import Bundle, BundleError
from core.recipes import GATE_METRICS
from core.sequence import next_frame, prompt_frame
from runtime.pipeline import GenerationRequest, VLMPipeline

log = logging.getLogger(__name__)


@dataclass(eq=False)  # hashed by identity: the reference keeps its results per case
class Case:
    images: list[Any]
    prompt: str
    answer: str | None = None  # known answer (built-in data): task accuracy


def builtin_cases(n: int, split: str = "test", seed: int = 0) -> list[Case]:
    from core.shapes_dataset import ShapesDataset

    ds = ShapesDataset(split, seed=seed)
    return [Case([s.image], s.question, s.answer) for s in (ds[i] for i in range(n))]


def folder_cases(folder: str, n: int, prompts_file: str | None = None) -> list[Case]:
    from calibration.data import load_calibration

    cal = load_calibration(folder, n, prompts_file=prompts_file)
    return [Case(s.images, s.prompt) for s in cal.samples]


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def kl_divergence(ref_logits: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """KL(ref || other) per row, in nats."""
    p, q = log_softmax(ref_logits), log_softmax(logits)
    return (np.exp(p) * (p - q)).sum(-1)


def tie_margin(kl_mean_max: float) -> float:
    """The log-probability gap between the reference's top two tokens below which a flip is what a
    KL within the gate allows. For a small logit perturbation d, KL ~ Var_p(d)/2, so one logit moves
    by about sqrt(2 KL) and the gap between two by about 2 sqrt(KL): two of those is 4 sqrt(KL)."""
    return 4.0 * float(np.sqrt(kl_mean_max))


def top2_gap(ref_logits: np.ndarray) -> np.ndarray:
    """Per step, log p(top-1) - log p(top-2) of the reference: how decisive its choice was."""
    lp = np.sort(log_softmax(ref_logits), axis=-1)
    return lp[..., -1] - lp[..., -2]


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _same_case(a: Case, b: Case) -> bool:
    return (a.prompt, a.answer, len(a.images)) == (b.prompt, b.answer, len(b.images)) and all(
        x.tobytes() == y.tobytes() for x, y in zip(a.images, b.images, strict=True)
    )


class StoredReference:
    """The PyTorch results `nanovlm-export onnx` stored in the bundle (reference.npz) for a few
    built-in cases: the same comparison and gates as against the checkpoint, without torch.
    Quantized and TensorRT bundles carry their source bundle's file unchanged."""

    def __init__(self, bundle: Bundle):
        meta = bundle.manifest.reference
        if not meta:
            raise BundleError(
                f"{bundle.path}: no stored PyTorch reference (a bundle exported before they were stored); "
                "pass --reference CHECKPOINT"
            )
        with np.load(bundle.file(meta["file"]), allow_pickle=False) as stored:
            self.arrays = {k: stored[k] for k in stored.files}
        self.cases = builtin_cases(meta["cases"], meta["split"], meta["seed"])
        self.max_new_tokens = meta["max_new_tokens"]

    def run(self, pipe: VLMPipeline, case: Case, max_new_tokens: int) -> dict[str, Any]:
        if max_new_tokens > self.max_new_tokens:
            raise ValueError(
                f"the stored reference has {self.max_new_tokens} tokens per case; ask for at most that many"
            )
        i = next((k for k, c in enumerate(self.cases) if _same_case(c, case)), None)
        if i is None:
            raise ValueError(f"case {case.prompt!r} is not one of the stored reference's built-in cases")
        tokens = self.arrays[f"tokens_{i}"].tolist()[:max_new_tokens]
        batch = pipe.prepare([case.images], [case.prompt])
        return {
            "batch": batch,
            "vision": self.arrays[f"vision_{i}"],
            "tokens": tokens,
            "logits": self.arrays[f"logits_{i}"][: len(tokens)],
        }


# ----------------------------------------------------------------------------- bundle side
def bundle_run(pipe: VLMPipeline, batch: Any, forced: list[int], max_new_tokens: int) -> dict[str, Any]:
    """The bundle's image embeddings, its logits along the forced tokens, and its own greedy answer."""
    backend = pipe.backend
    has_images = batch.pixel_values.shape[0] > 0
    hidden = pipe.cfg.lm_hidden_dim
    vision = backend.encode_images(batch.pixel_values) if has_images else np.zeros((0, 0, hidden), np.float32)
    frame = prompt_frame(pipe.cfg, batch, vision)
    cache = backend.new_cache(1, frame.shape[1] + len(forced) + 1)
    cache.start(1)
    steps = [pipe.step(frame, cache)[0].copy()]
    for token in forced[:-1]:
        frame = next_frame(frame, np.array([token], np.int64))
        steps.append(pipe.step(frame, cache)[0].copy())
    request = GenerationRequest(max_new_tokens=max_new_tokens)
    eos = pipe.tokenizer.eos_token_id
    own: list[int] = []
    for token in pipe.generate_ids(batch, request):
        own.append(int(token[0]))
        if own[-1] == eos:
            break
    return {"vision": vision, "logits": np.stack(steps), "tokens": own}


# ----------------------------------------------------------------------------- comparison
class Reference(Protocol):
    def run(self, pipe: VLMPipeline, case: Case, max_new_tokens: int) -> dict[str, Any]:
        """{"batch", "vision", "tokens", "logits"} of the reference for one case."""


def decoder_row(
    ref_logits: np.ndarray, logits: np.ndarray, ref_tokens: list[int], tokens: list[int]
) -> dict[str, Any]:
    """One case's decoder metrics: teacher-forced logits [steps, V] of both sides and each side's
    own greedy tokens."""
    return {
        "logits_max_abs": float(np.abs(ref_logits - logits).max()),
        "kl": kl_divergence(ref_logits, logits).tolist(),
        "top1": (ref_logits.argmax(-1) == logits.argmax(-1)).tolist(),
        "exact_match": ref_tokens == tokens,
        "common_prefix": common_prefix(ref_tokens, tokens),
        "reference_length": len(ref_tokens),
        "gap": top2_gap(ref_logits).tolist(),
    }


def compare(
    pipe: VLMPipeline,
    reference: Reference,
    cases: list[Case],
    max_new_tokens: int = 16,
    desc: str = "validating",
    near_tie: float = 0.0,
) -> dict[str, Any]:
    """All metrics over `cases`; per-case rows under "rows". `near_tie`: the reference's top-two
    gap (nats) below which a step counts as near-tied (tie_margin of the KL gate; 0: none)."""
    from core.progress import progress

    rows = []
    for case in progress(cases, desc=desc, unit="case", leave=False):
        ref = reference.run(pipe, case, max_new_tokens)
        got = bundle_run(pipe, ref["batch"], ref["tokens"], max_new_tokens)
        row: dict[str, Any] = {"prompt": case.prompt}
        if ref["vision"].size:
            a = ref["vision"].reshape(-1, ref["vision"].shape[-1]).astype(np.float64)
            b = got["vision"].reshape(-1, got["vision"].shape[-1]).astype(np.float64)
            cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-30)
            row |= {"vision_max_abs": float(np.abs(a - b).max()), "vision_cosine_min": float(cos.min())}
        row |= decoder_row(ref["logits"], got["logits"], ref["tokens"], got["tokens"])
        row |= {
            "reference_answer": pipe.tokenizer.decode(
                [t for t in ref["tokens"] if t != pipe.tokenizer.eos_token_id]
            ),
            "answer": pipe.tokenizer.decode([t for t in got["tokens"] if t != pipe.tokenizer.eos_token_id]),
        }
        if case.answer is not None:
            row["expected"] = case.answer
        rows.append(row)
    return summarize(rows, near_tie)


def summarize(rows: list[dict[str, Any]], near_tie: float = 0.0) -> dict[str, Any]:
    kl = np.concatenate([np.asarray(r["kl"], np.float64) for r in rows])
    top1 = np.concatenate([np.asarray(r["top1"], bool) for r in rows])
    decisive = np.concatenate([np.asarray(r["gap"], np.float64) for r in rows]) >= near_tie
    for r in rows:  # an answer that parts from the reference's where the reference nearly tied
        d = r["common_prefix"]
        r["parts_at_near_tie"] = not r["exact_match"] and d < len(r["gap"]) and r["gap"][d] < near_tie
    clear = [r for r in rows if not r["parts_at_near_tie"]]
    out: dict[str, Any] = {
        "cases": len(rows),
        "steps": int(kl.size),
        "kl_mean": float(kl.mean()),
        "kl_max": float(kl.max()),
        "top1_agreement": float(top1.mean()),
        "logits_max_abs": max(r["logits_max_abs"] for r in rows),
        "exact_match": float(np.mean([r["exact_match"] for r in rows])),
        "common_prefix_ratio": float(
            sum(r["common_prefix"] for r in rows) / max(1, sum(r["reference_length"] for r in rows))
        ),
        "near_tie": near_tie,
        "near_tied_steps": int((~decisive).sum()),
        "parted_at_near_tie": len(rows) - len(clear),
    }
    if decisive.any():  # absent when every step was a near tie: KL is the only fair gate there
        out["top1_decisive"] = float(top1[decisive].mean())
    if clear:
        out["exact_match_decisive"] = float(np.mean([r["exact_match"] for r in clear]))
    with_vision = [r for r in rows if "vision_cosine_min" in r]
    if with_vision:
        out["vision_max_abs"] = max(r["vision_max_abs"] for r in with_vision)
        out["vision_cosine_min"] = min(r["vision_cosine_min"] for r in with_vision)
    known = [r for r in rows if "expected" in r]
    if known:
        out["task_accuracy"] = float(np.mean([r["answer"].strip() == r["expected"] for r in known]))
        out["reference_task_accuracy"] = float(
            np.mean([r["reference_answer"].strip() == r["expected"] for r in known])
        )
    out["rows"] = rows
    return out


def gate(summary: dict[str, Any], thresholds: dict[str, float]) -> list[str]:
    """The failed checks, as readable lines (empty: all passed)."""
    failures = []
    for key, limit in thresholds.items():
        metric, kind = GATE_METRICS[key]
        if metric not in summary:
            continue
        value = summary[metric]
        if (kind == "min" and value < limit) or (kind == "max" and value > limit):
            failures.append(f"{metric} = {value:.6g} {'<' if kind == 'min' else '>'} {limit:g}")
    return failures


def ties_note(summary: dict[str, Any]) -> str | None:
    """One line on the near ties left to the KL gate, or None when there were none."""
    steps, cases = summary.get("near_tied_steps", 0), summary.get("parted_at_near_tie", 0)
    if not steps:
        return None
    return (
        f"near ties: {steps} of {summary['steps']} steps had the reference's top two tokens within "
        f"{summary['near_tie']:.3g} nats (4*sqrt of the KL gate); top-1 is gated on the other steps, and "
        f"{cases} of {summary['cases']} answers that part from the reference's at such a step are gated "
        f"on KL (kl_mean {summary['kl_mean']:.3g}) instead of exact match"
    )


def table(summary: dict[str, Any], thresholds: dict[str, float] | None = None) -> str:
    """A readable markdown table of the summary."""
    limits = {GATE_METRICS[k][0]: (v, GATE_METRICS[k][1]) for k, v in (thresholds or {}).items()}
    lines = ["| metric | value | gate |", "| --- | --- | --- |"]
    for key in (
        "cases",
        "steps",
        "vision_cosine_min",
        "vision_max_abs",
        "kl_mean",
        "kl_max",
        "top1_agreement",
        "top1_decisive",
        "logits_max_abs",
        "exact_match",
        "exact_match_decisive",
        "near_tied_steps",
        "parted_at_near_tie",
        "common_prefix_ratio",
        "task_accuracy",
        "reference_task_accuracy",
    ):
        if key not in summary:
            continue
        value = summary[key]
        text = f"{value:.6g}" if isinstance(value, float) else str(value)
        g = ""
        if key in limits:
            limit, kind = limits[key]
            ok = value >= limit if kind == "min" else value <= limit
            g = f"{'>=' if kind == 'min' else '<='} {limit:g} {'ok' if ok else 'FAIL'}"
        lines.append(f"| {key} | {text} | {g} |")
    return "\n".join(lines)
