"""Runs on an emulated aarch64 CPU (tests/test_arm64.py starts it under qemu-user): each bundle's
greedy answers and its parity against the PyTorch results stored in it, torch-free.

    python tests/arm64_check.py PLAN.json OUT.json

PLAN: [{"bundle": DIR, "cases": [{"image": PNG or null, "prompt": str, "max_new_tokens": n}]}].
OUT: per bundle its answers, the stored-reference summary (KL, top-1, exact match) and the gate
failures of its recipe (validate's gates), plus the machine this ran on.
"""

from __future__ import annotations

import json
import platform
import sys
import time


def greedy_ids(pipe, case: dict) -> list[int]:
    """The greedy answer's token ids (EOS included when it comes)."""
    from runtime.pipeline import GenerationRequest

    batch = pipe.prepare([[case["image"]] if case["image"] else []], [case["prompt"]])
    return [int(t[0]) for t in pipe.generate_ids(batch, GenerationRequest(case["max_new_tokens"]))]


def main(plan_path: str, out_path: str) -> None:
    from core.recipes import gates_for
    from evaluation import metrics
    from runtime.pipeline import VLMPipeline

    with open(plan_path) as f:
        plan = json.load(f)
    out = {"machine": platform.machine(), "bundles": []}
    for item in plan:
        t0 = time.perf_counter()
        pipe = VLMPipeline.from_bundle(item["bundle"], threads=1)
        answers = [greedy_ids(pipe, c) for c in item["cases"]]
        stored = metrics.StoredReference(pipe.bundle)
        summary = metrics.compare(pipe, stored, stored.cases, stored.max_new_tokens)
        summary.pop("cases", None)
        gates = gates_for(pipe.bundle.mode)
        failures = metrics.gate(summary, gates)
        kl_failures = metrics.gate(
            summary, {k: v for k, v in gates.items() if k.startswith(("kl", "vision"))}
        )
        out["bundles"].append(
            {
                "bundle": item["bundle"],
                "mode": pipe.bundle.mode,
                "answers": answers,
                "summary": {k: v for k, v in summary.items() if isinstance(v, (int, float))},
                "failures": failures,
                "kl_failures": kl_failures,
                "seconds": round(time.perf_counter() - t0, 1),
            }
        )
        print(
            f"{item['bundle']}: {len(failures)} gate failures, {time.perf_counter() - t0:.1f} s", flush=True
        )
    with open(out_path, "w") as f:
        json.dump(out, f, indent=2)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
