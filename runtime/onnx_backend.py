"""ONNX Runtime sessions for a bundle: providers, session options, IO binding, the KV cache.

The KV cache (runtime/kv_cache.py) lives in preallocated flat buffers per layer and direction, sized for the largest
context of the generation, used in turn: a step reads its past from one and ONNX Runtime writes the
present straight into the other (IO binding), so a step allocates nothing and the runtime copies
nothing; the graph's own Concat is the one pass over the cache. The fused decoder needs no pass at
all: its GroupQueryAttention takes a past buffer longer than the context as the whole cache and
writes the new positions into it, so one buffer is bound as both past and present (docs/bundle.md).
On CUDA the buffers and the logits stay on the device except for the [B, V] logits read back for
sampling.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from core.bundle import Bundle
from core.sequence import Frame

from .kv_cache import KVCache

log = logging.getLogger(__name__)

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
FUSED_MIN_ORT = "1.22"  # GroupQueryAttention with attention_bias (docs/bundle.md, "The fused decoder")
PACKAGE_FOR = {"cuda": "onnxruntime-gpu", "tensorrt": "onnxruntime-gpu (built with TensorRT) and tensorrt"}


def session_options(
    threads: int | None = None,
    optimized_model_path: str | None = None,
    literal_qdq: bool = False,
    profile_prefix: str | None = None,
    spinning: bool = True,
) -> Any:
    """`literal_qdq`: run QuantizeLinear/DequantizeLinear as written (the int8-static bundles, made
    for TensorRT). Otherwise the CPU provider fuses a weight's DequantizeLinear into MatMulNBits,
    which quantizes the activations to int8 at run time: not what the graph says, nor what TensorRT
    computes from it (calibration/qdq.py). `profile_prefix`: onnxruntime's per-node profile, written
    to PREFIX_<date>.json when the session ends profiling. `spinning=False`: idle intra-op threads
    sleep instead of spinning, for sessions that run at the same time (the serving engine's encoder
    beside its decoder: spinning, each steals the other's cores; on 2 cores a decode step next to a
    running vision encoder takes 30 ms spinning, 17 ms not, against 11 ms alone; docs/serving.md)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    # All graph rewrites (constant folding, MatMul/Add and attention-pattern fusions) happen once at
    # load; sequential execution because a decode step is a chain of small ops, where inter-op
    # parallelism only adds scheduling overhead; intra-op threads = cores for the MatMuls.
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = threads or os.cpu_count() or 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if optimized_model_path:
        so.optimized_model_filepath = optimized_model_path
    if literal_qdq:
        so.add_session_config_entry("session.disable_quant_qdq", "1")
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    return so


class OrtBackend:
    def __init__(
        self,
        bundle: Bundle,
        provider: str = "cpu",
        threads: int | None = None,
        engine_cache: str | None = None,
        fp16: bool = False,
        int8: bool = False,
        max_batch: int = 4,
        max_images: int = 16,
        profile_dir: str | None = None,
        spinning: bool = True,
    ):
        import onnxruntime as ort

        if provider not in PROVIDERS:
            raise ValueError(f"unknown provider {provider!r}; expected one of {', '.join(PROVIDERS)}")
        name = PROVIDERS[provider]
        if name not in ort.get_available_providers():
            raise RuntimeError(
                f"provider {provider!r} ({name}) is not available in this onnxruntime "
                f"({', '.join(ort.get_available_providers())}); install {PACKAGE_FOR.get(provider, 'onnxruntime')}"
            )
        self.bundle, self.provider = bundle, provider
        self.device = "cuda" if provider in ("cuda", "tensorrt") else "cpu"
        kv = bundle.kv
        self.kv, self.kv_dtype = kv, np.dtype(kv.dtype)
        self.max_context = bundle.config.lm_max_position_embeddings
        self.vocab = bundle.vocab_size
        fused = bundle.fused
        self.kv_in_place = fused
        if fused and provider != "cpu":
            log.warning(
                "%s has the fused decoder, an fp32 CPU graph (onnxruntime's GroupQueryAttention has no fp32 "
                "CUDA kernel): its attention runs on the CPU. On a GPU use a bundle with the standard decoder.",
                bundle.path,
            )
        self.sessions = {}
        for graph in ("vision_encoder", "decoder"):
            opts: dict[str, Any] = {}
            if provider == "tensorrt":
                from trt.plan import trt_profile_shapes

                cache = engine_cache or os.path.join(bundle.path, "trt_cache")
                opts = {
                    "trt_engine_cache_enable": True,
                    "trt_engine_cache_path": cache,
                    "trt_fp16_enable": fp16,
                    "trt_int8_enable": int8,
                    "trt_timing_cache_enable": True,
                }
                opts |= trt_profile_shapes(bundle, max_batch, self.max_context, max_images)[graph]
            providers = [(name, opts)] + (
                [("CPUExecutionProvider", {})] if name != "CPUExecutionProvider" else []
            )
            try:
                self.sessions[graph] = ort.InferenceSession(
                    bundle.graph_path(graph),
                    session_options(
                        threads,
                        literal_qdq=bundle.recipe.scheme == "qdq",
                        profile_prefix=os.path.join(profile_dir, graph) if profile_dir else None,
                        spinning=spinning,
                    ),
                    providers=providers,
                )
            except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
                if not (fused and graph == "decoder"):
                    raise
                raise RuntimeError(
                    f"{bundle.graph_path(graph)}: onnxruntime {ort.__version__} cannot load the fused decoder "
                    f"(it needs onnxruntime >= {FUSED_MIN_ORT}): {e}"
                ) from None
        self.io = self.sessions["decoder"].io_binding()
        self._bound: tuple[Any, ...] | None = None  # (cache, src, dst, shapes) the KV tensors are bound to

    # ------------------------------------------------------------------ vision
    def encode_images(self, pixel_values: np.ndarray) -> np.ndarray:
        """[N, 3, S, S] float32 -> [N, image_tokens, hidden] float32 (on the host).

        On the CPU one view per run: a layer's activations for one 512 px view (1,024 x 3,072
        floats, 12 MB) stay in the last-level cache, and 17 views at once encode 25% slower per
        view (benchmarks/first_photo.py). A GPU takes them all at once."""
        step = 1 if self.device == "cpu" else len(pixel_values)
        session = self.sessions["vision_encoder"]
        outs = [
            session.run(None, {"pixel_values": np.ascontiguousarray(pixel_values[i : i + step])})[0]
            for i in range(0, len(pixel_values), max(step, 1))
        ]
        return outs[0] if len(outs) == 1 else np.concatenate(outs)

    # ------------------------------------------------------------------ KV cache
    def new_cache(self, rows: int, length: int) -> KVCache:
        return KVCache(self.kv, rows, length, self.kv_in_place, self.device)

    def step(self, frame: Frame, cache: KVCache) -> np.ndarray:
        """One decoder call over S new positions on `cache` (runtime/backend.py); logits [B, V]."""
        B, S = frame.input_ids.shape
        io = self.io
        # The KV tensors (2 per layer, in and out) are rebound only when their buffers or shapes
        # change: on the fused decoder that is when the batch does, not every step (a rebinding
        # costs ~0.6 ms on the 222M shape's 30 layers). Binding a name again replaces it.
        bound = (cache, *cache.bindings(B, S))
        if self._bound is None or bound[0] is not self._bound[0] or bound[1:] != self._bound[1:]:
            io.clear_binding_inputs()
            io.clear_binding_outputs()
            _, src, dst, past_shape, present_shape = bound
            for i in range(self.kv.layers):
                for j, part in enumerate(("key", "value")):
                    io.bind_input(
                        f"past_key_values.{i}.{part}",
                        self.device,
                        0,
                        self.kv_dtype,
                        past_shape,
                        cache.pointer(src, 2 * i + j),
                    )
                    io.bind_output(
                        f"present.{i}.{part}",
                        self.device,
                        0,
                        self.kv_dtype,
                        present_shape,
                        cache.pointer(dst, 2 * i + j),
                    )
            self._bound = bound  # holds the cache, so its buffers outlive the binding
        io.bind_cpu_input("input_ids", np.ascontiguousarray(frame.input_ids, dtype=np.int64))
        io.bind_cpu_input("image_embeds", np.ascontiguousarray(frame.image_rows, dtype=np.float32))
        io.bind_cpu_input("attention_mask", np.ascontiguousarray(frame.attention_mask, dtype=np.int64))
        io.bind_cpu_input("position_ids", np.ascontiguousarray(frame.position_ids, dtype=np.int64))
        logits = np.empty((B, self.vocab), dtype=np.float32)  # written in place by ONNX Runtime
        io.bind_output("logits", "cpu", 0, np.float32, logits.shape, logits.ctypes.data)
        self.sessions["decoder"].run_with_iobinding(io)
        cache.advance(S)
        return logits
