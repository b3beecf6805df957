"""`nanovlm-export bench`: speed, memory and size of the PyTorch reference and bundle variants.

Every measurement runs in a fresh process (so peak resident memory is that backend's own), with a
warm-up run and `repeats` timed runs (median and spread): image encode, time to first token,
prefill positions/s, decode tokens/s (EOS ignored: every run makes the same number of tokens).
PyTorch is measured with its KV cache and without one (the seed's loop recomputes the whole
sequence each step), at several output lengths, to show how the cost grows.
"""

from __future__ import annotations

import concurrent.futures
import logging
import multiprocessing
import os
import resource
import statistics
import time
from typing import Any

import numpy as np

from core.files import atomic_write

from .power import PowerMonitor

log = logging.getLogger(__name__)

DEFAULT_PROMPT = "Describe this image in detail."


AVX2_PROXY_ENV = "NANOVLM_AVX2_PROXY"  # set by benchmarks/avx2_proxy.py for the command it runs


def cpu_kind() -> str:
    """The CPU kind that decides which integer kernels run (and how fast), from /proc/cpuinfo."""
    import platform

    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            line = next((x for x in f if x.startswith(("flags", "Features"))), "")
        flags = set(line.partition(":")[2].split())
    except OSError:
        pass
    kinds = (
        ("avx512_vnni", "AVX-512 VNNI"),
        ("avx512f", "AVX-512 without VNNI"),
        ("avx_vnni", "AVX2 with AVX-VNNI"),
        ("avx2", "AVX2 only"),
        ("asimddp", "ARM64 with dot product"),
    )
    kind = next((name for flag, name in kinds if flag in flags), platform.machine() or "unknown CPU")
    if os.environ.get(AVX2_PROXY_ENV):
        kind = f"AVX2 kernels on an {kind} CPU (benchmarks/avx2_proxy.py)"
    return kind


def machine(threads: int | None = None) -> str:
    """What every speed figure should say it came from: threads and CPU kind."""
    n = threads or os.cpu_count() or 1
    return f"{n} CPU thread{'s' if n != 1 else ''}, {cpu_kind()}"


def spread(values: list[float]) -> dict[str, float]:
    """Median, min and max of repeated measurements."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def bench_image(image: str | None) -> Any:
    """The image to benchmark with: the file given, or scikit-image's astronaut photograph."""
    from PIL import Image

    from core.processors import load_image

    if image:
        return load_image(image)
    from skimage import data  # a real photograph shipped with scikit-image

    return Image.fromarray(data.astronaut())


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def runtime_run(pipe: Any, batch: Any, request: Any) -> tuple[list[int], Any]:
    """The runtime's one timed generation: -> (row 0's tokens, the pipeline's Timings). Every
    runtime speed figure (bench, benchmarks/) comes from these Timings."""
    tokens = [int(t[0]) for t in pipe.generate_ids(batch, request)]
    return tokens, pipe.last_timings


def bundle_worker(
    path: str, image: str | None, prompt: str, max_new_tokens: int, repeats: int, threads: int | None
) -> dict[str, Any]:
    """(in a child process) the runtime on one bundle."""
    from runtime.pipeline import GenerationRequest, VLMPipeline

    pipe = VLMPipeline.from_bundle(path, threads=threads)
    batch = pipe.prepare([[bench_image(image)]], [prompt])
    request = GenerationRequest(max_new_tokens=max_new_tokens, ignore_eos=True)
    monitor = PowerMonitor.detect()
    runs = []
    for k in range(repeats + 1):
        if k == 1:
            monitor.start()  # power over the timed runs only
        tokens, timings = runtime_run(pipe, batch, request)
        if k:  # the first run is the warm-up
            runs.append(timings)
    power = monitor.stop()
    if power["available"]:
        power["tokens_per_joule"] = repeats * max_new_tokens / power["energy_j"]
    t = runs[0]
    return {
        "name": os.path.basename(os.path.normpath(path)),
        "kind": "bundle",
        "precision": pipe.bundle.mode,
        "image_encode_s": spread([r.image_encode_s for r in runs]),
        "ttft_s": spread([r.time_to_first_token_s for r in runs]),
        "prefill_positions_per_s": spread([r.prompt_tokens / r.prefill_s for r in runs]),
        "decode_tokens_per_s": spread([r.decode_tokens_per_s for r in runs]),
        "prompt_positions": t.prompt_tokens,
        "max_new_tokens": max_new_tokens,
        "bytes": pipe.bundle.total_bytes(),
        "peak_rss_mb": _peak_rss_mb(),
        "power": power,
        "tokens": tokens,
    }


def pytorch_worker(
    checkpoint: str,
    image: str | None,
    prompt: str,
    max_new_tokens: int,
    repeats: int,
    threads: int | None,
    kv_cache: bool,
) -> dict[str, Any]:
    """(in a child process) the PyTorch reference, fp32, with or without its KV cache."""
    import torch

    from core.processors import ImageProcessor, prepare_batch
    from nanovlm.checkpoint import resolve_checkpoint
    from nanovlm.vision_language_model import VisionLanguageModel

    torch.set_num_threads(threads or os.cpu_count() or 1)
    model = VisionLanguageModel.from_pretrained(resolve_checkpoint(checkpoint)).eval()
    batch = prepare_batch(
        model.cfg, model.tokenizer, ImageProcessor.from_config(model.cfg), [[bench_image(image)]], [prompt]
    )
    ids, px = torch.from_numpy(batch.input_ids), torch.from_numpy(batch.pixel_values)
    mask0 = torch.from_numpy(batch.attention_mask)

    @torch.inference_mode()
    def run() -> tuple[list[int], dict[str, float]]:
        t0 = time.perf_counter()
        embeds = model.encode_images(px)
        t_img = time.perf_counter() - t0
        merged, mask = model.merge_image_embeds(ids, embeds, mask0)
        if kv_cache:
            logits, state = model.prefill(merged, mask)
        else:
            hidden, _ = model.decoder(merged, mask)
            logits = model.decoder.head(hidden[:, -1])
        ttft = time.perf_counter() - t0
        out = [int(logits.argmax(-1))]
        t1 = time.perf_counter()
        seq = merged
        for _ in range(max_new_tokens - 1):
            token = logits.argmax(-1)
            if kv_cache:
                logits, state = model.decode_one_token(token, state)
            else:  # the seed's way: the whole sequence again, every step
                mask = torch.cat((mask, torch.ones_like(mask[:, :1])), 1)
                seq = torch.cat((seq, model.decoder.token_embedding(token[:, None])), 1)
                hidden, _ = model.decoder(seq, mask)
                logits = model.decoder.head(hidden[:, -1])
            out.append(int(logits.argmax(-1)))
        decode = time.perf_counter() - t1
        return out, {
            "image_encode_s": t_img,
            "ttft_s": ttft,
            "prefill_s": ttft - t_img,
            "decode_tokens_per_s": (max_new_tokens - 1) / decode if max_new_tokens > 1 else 0.0,
            "positions": merged.shape[1],
        }

    runs = []
    for k in range(repeats + 1):
        tokens, t = run()
        if k:
            runs.append(t)
    return {
        "name": "pytorch" + ("" if kv_cache else " (no KV cache)"),
        "kind": "pytorch",
        "precision": "fp32",
        "image_encode_s": spread([r["image_encode_s"] for r in runs]),
        "ttft_s": spread([r["ttft_s"] for r in runs]),
        "prefill_positions_per_s": spread([r["positions"] / r["prefill_s"] for r in runs]),
        "decode_tokens_per_s": spread([r["decode_tokens_per_s"] for r in runs]),
        "prompt_positions": runs[0]["positions"],
        "max_new_tokens": max_new_tokens,
        "bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "peak_rss_mb": _peak_rss_mb(),
        "tokens": tokens,
    }


def in_fresh_process(fn, *args: Any) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(fn, *args).result()


def bench(
    bundles: list[str],
    reference: str | None = None,
    image: str | None = None,
    prompt: str = DEFAULT_PROMPT,
    max_new_tokens: int = 64,
    repeats: int = 3,
    threads: int | None = None,
    growth: tuple[int, ...] = (16, 32, 64),
) -> dict[str, Any]:
    """All rows, measured in this one run; `growth`: output lengths for the PyTorch growth curve."""
    rows = []
    if reference:
        log.info("bench: pytorch (KV cache)")
        rows.append(
            in_fresh_process(pytorch_worker, reference, image, prompt, max_new_tokens, repeats, threads, True)
        )
    for path in bundles:
        log.info("bench: %s", path)
        rows.append(in_fresh_process(bundle_worker, path, image, prompt, max_new_tokens, repeats, threads))
    curve = []
    if reference and growth:
        for n in growth:
            log.info("bench: growth with output length, %d tokens", n)
            with_cache = in_fresh_process(pytorch_worker, reference, image, prompt, n, 1, threads, True)
            without = in_fresh_process(pytorch_worker, reference, image, prompt, n, 1, threads, False)
            runtime = (
                in_fresh_process(bundle_worker, bundles[0], image, prompt, n, 1, threads) if bundles else None
            )
            curve.append(
                {
                    "max_new_tokens": n,
                    "pytorch_kv_s_per_token": 1 / with_cache["decode_tokens_per_s"]["median"],
                    "pytorch_no_cache_s_per_token": 1 / without["decode_tokens_per_s"]["median"],
                    "runtime_s_per_token": 1 / runtime["decode_tokens_per_s"]["median"] if runtime else None,
                }
            )
    first = rows[0]["tokens"] if rows else []
    for r in rows:
        r["same_tokens_as_first"] = r.pop("tokens") == first
    return {
        "rows": rows,
        "growth": curve,
        "max_new_tokens": max_new_tokens,
        "repeats": repeats,
        "threads": threads or os.cpu_count(),
        "machine": machine(threads),
    }


def table(result: dict[str, Any]) -> str:
    lines = [
        f"{result['machine']}\n" if "machine" in result else "",
        "| backend | precision | size (MB) | peak RSS (MB) | image encode (s) | TTFT (s) | prefill pos/s | decode tok/s (min-max) | power W | tokens/J | peak RAM in use (MB) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    notes = set()
    for r in result["rows"]:
        d = r["decode_tokens_per_s"]
        p = r.get("power") or {"available": False, "reason": "n/a: not measured for PyTorch"}
        if p["available"]:
            ram = f"{p['peak_ram_mb']:.0f}" if p["peak_ram_mb"] is not None else "n/a (no RAM in sysfs)"
            energy = f"{p['total_w']:.2f} ({p['total_rail']}) | {p['tokens_per_joule']:.1f} | {ram}"
        else:
            energy = "n/a | n/a | n/a"
            notes.add(p["reason"])
        lines.append(
            f"| {r['name']} | {r['precision']} | {r['bytes'] / 1e6:.1f} | {r['peak_rss_mb']:.0f} | "
            f"{r['image_encode_s']['median']:.3f} | {r['ttft_s']['median']:.3f} | "
            f"{r['prefill_positions_per_s']['median']:.0f} | {d['median']:.1f} ({d['min']:.1f}-{d['max']:.1f}) | "
            f"{energy} |"
        )
    lines += [f"\npower, tokens/J, RAM in use: {n}" for n in sorted(notes)]
    rails = {
        r["name"]: r["power"]["rails_w"] for r in result["rows"] if (r.get("power") or {}).get("available")
    }
    for name, watts in rails.items():
        lines.append(f"\n{name} rails (W): " + ", ".join(f"{k} {v:.2f}" for k, v in watts.items()))
    if result["growth"]:
        lines += [
            "",
            "| new tokens | PyTorch KV cache (ms/token) | PyTorch no cache (ms/token) | runtime (ms/token) |",
            "| --- | --- | --- | --- |",
        ]
        for g in result["growth"]:
            rt = f"{g['runtime_s_per_token'] * 1e3:.1f}" if g["runtime_s_per_token"] else "-"
            lines.append(
                f"| {g['max_new_tokens']} | {g['pytorch_kv_s_per_token'] * 1e3:.1f} | "
                f"{g['pytorch_no_cache_s_per_token'] * 1e3:.1f} | {rt} |"
            )
    return "\n".join(lines)


PLOT_SOFTWARE = "nanovlm-export bench"  # the PNG's Software text: marks a chart as bench's own


def is_bench_plot(path: str) -> bool:
    """Whether `path` is a PNG that `plot` wrote (bench replaces only its own chart by default)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.format == "PNG" and im.info.get("Software") == PLOT_SOFTWARE
    except (OSError, ValueError):
        return False


def plot(result: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    panels = 3 if result["growth"] else 2
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), layout="constrained")
    names = [r["name"] for r in rows]
    dec = [r["decode_tokens_per_s"]["median"] for r in rows]
    err = np.array(
        [
            [d - r["decode_tokens_per_s"]["min"], r["decode_tokens_per_s"]["max"] - d]
            for d, r in zip(dec, rows, strict=True)
        ]
    ).T
    axes[0].barh(names, dec, xerr=err, color="tab:blue")
    axes[0].set_xlabel("decode tokens/s (higher is better)")
    axes[1].barh(names, [r["ttft_s"]["median"] for r in rows], color="tab:orange")
    axes[1].set_xlabel("time to first token, s (lower is better)")
    if result["growth"]:
        g = result["growth"]
        n = [x["max_new_tokens"] for x in g]
        axes[2].plot(
            n, [x["pytorch_no_cache_s_per_token"] * 1e3 for x in g], "o-", label="PyTorch, no KV cache"
        )
        axes[2].plot(n, [x["pytorch_kv_s_per_token"] * 1e3 for x in g], "o-", label="PyTorch, KV cache")
        if g[0]["runtime_s_per_token"]:
            axes[2].plot(
                n,
                [x["runtime_s_per_token"] * 1e3 for x in g],
                "o-",
                label=f"runtime ({rows[1]['name']})" if len(rows) > 1 else "runtime",
            )
        axes[2].set_xlabel("new tokens")
        axes[2].set_ylabel("ms per token")
        axes[2].set_ylim(bottom=0)
        axes[2].legend(fontsize="small", loc="upper left")
    fig.suptitle(
        f"{result.get('machine', str(result['threads']) + ' threads')}, median of {result['repeats']}"
    )
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110, metadata={"Software": PLOT_SOFTWARE})
    plt.close(fig)
