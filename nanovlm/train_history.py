"""The training history (one JSON line per logged step) and its curves as a PNG."""

from __future__ import annotations

import json
import os

from core.files import atomic_write


def append_history(path: str, entry: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(entry) + "\n")


def read_history(path: str, upto: int) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if r["step"] <= upto]


def write_history(path: str, rows: list[dict]) -> None:
    with atomic_write(path) as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def plot_history(history: list[dict], path: str, blind_baseline: float | None = None) -> None:
    """Training loss, validation loss and answer accuracy against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [h for h in history if "loss" in h]
    evals = [h for h in history if "accuracy" in h]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot([h["step"] for h in train], [h["loss"] for h in train], label="train loss")
    ax1.plot([h["step"] for h in evals], [h["val_loss"] for h in evals], "o-", label="validation loss")
    ax1.set_yscale("log")
    ax1.set_xlabel("step")
    ax1.legend()
    ax2.plot([h["step"] for h in evals], [100 * h["accuracy"] for h in evals], "o-", label="exact match")
    if blind_baseline is not None:
        ax2.axhline(
            100 * blind_baseline, linestyle="--", color="gray", label="blind baseline (question only)"
        )
    ax2.set_ylim(0, 100)
    ax2.set_xlabel("step")
    ax2.set_ylabel("validation accuracy (%)")
    ax2.legend()
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
    plt.close(fig)
