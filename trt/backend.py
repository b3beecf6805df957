"""TensorRT backend: runtime/backend.py's contract (encode_images / new_cache / step), no torch.

Engines come from `nanovlm-export trt` (their manifest entry names the TensorRT version and GPU
they were built for; anything else is refused with "rebuild"), and their IO tensors must have the
names and dtypes the bundle's graphs record. Device memory is allocated once, at the engines'
limits: the KV cache as two ping-pong sets (so there is one cache at a time: `new_cache` hands
out a frame over them, and a newer one takes them over) (each step reads its past from one set and TensorRT
writes the present into the other), the inputs, the logits, and one activation block that every
execution context shares (they run one at a time on one stream; on an 8 GB Orin a block per
context would double the engines' working memory). One context per decoder profile (decode,
prefill), each bound to its profile once; a step picks the context whose profile holds its
shapes, sets the input shapes and tensor addresses (each call checked), and runs
`execute_async_v3` on the backend's stream. CUDA calls go through cuda-python.

Written against the TensorRT 10 and cuda-python documentation; run where both exist
(tests/test_trt.py), never on the CPU machines this project is developed on.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from core.bundle import Bundle, BundleError
from core.sequence import Frame

from .plan import (
    ProfileLimits,
    check_engine_compatible,
    check_io_dtypes,
    io_dtypes,
    pick_profile,
    prefill_image_rows,
)

log = logging.getLogger(__name__)


def _check(result: Any) -> Any:
    """cuda-python calls return (error, *values): raise on error, return the values."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeError(f"CUDA error {err}")
    return values[0] if len(values) == 1 else values


def device_info() -> dict[str, Any]:
    """Name and compute capability of CUDA device 0 (what engines are tied to)."""
    from cuda.bindings import runtime as cudart

    props = _check(cudart.cudaGetDeviceProperties(0))
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return {"name": name.rstrip("\x00"), "compute_capability": [props.major, props.minor]}


def _ok(accepted: bool, what: str) -> None:
    """TensorRT's setters return False (and log) instead of raising: make that an error here."""
    if not accepted:
        raise RuntimeError(f"TensorRT refused {what} (see the TensorRT log above)")


def stream_handle(stream: Any) -> int:
    """The raw cudaStream_t: `getPtr()` (cuda-bindings >= 12.9 deprecate `int(stream)`)."""
    return int(stream.getPtr()) if hasattr(stream, "getPtr") else int(stream)


class DeviceBuffer:
    def __init__(self, cudart: Any, nbytes: int):
        self.cudart, self.nbytes = cudart, max(nbytes, 1)
        self.ptr = int(_check(cudart.cudaMalloc(self.nbytes)))

    def free(self) -> None:
        if self.ptr:
            self.cudart.cudaFree(self.ptr)
            self.ptr = 0


class TrtCache:
    """A frame over the backend's KV buffers: `length` positions filled, set `turn` holds them."""

    def __init__(self, rows: int, length: int):
        self.capacity = (rows, length)
        self.rows, self.length, self.turn = rows, 0, 0

    def start(self, rows: int, length: int = 0) -> None:
        if length:
            raise ValueError("the TensorRT cache starts empty (its buffers are the engines' own)")
        if rows > self.capacity[0]:
            raise ValueError(f"{rows} rows exceed the cache's {self.capacity[0]}")
        self.rows, self.length, self.turn = rows, 0, 0


class TrtBackend:
    def __init__(self, bundle: Bundle):
        meta = bundle.manifest.tensorrt
        if not meta:
            raise BundleError(f"{bundle.path}: no TensorRT engines; build them with `nanovlm-export trt`")
        try:
            import tensorrt as trt
            from cuda.bindings import runtime as cudart
        except ImportError as e:
            from core.install import install_hint

            raise RuntimeError(
                f"the TensorRT backend needs the tensorrt and cuda-python packages ({e}): "
                f"{install_hint('trt')} (on a Jetson, tensorrt comes with JetPack)"
            ) from None
        self.trt, self.cudart = trt, cudart
        device = device_info()
        self.limits = ProfileLimits(**meta["limits"])
        self.stream = _check(cudart.cudaStreamCreate())
        self.handle = stream_handle(self.stream)
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engines, self.profiles = {}, {}
        for graph, emeta in meta["engines"].items():
            check_engine_compatible(emeta, trt.__version__, device)
            with open(bundle.file(emeta["file"]), "rb") as f:
                engine = self.runtime.deserialize_cuda_engine(f.read())
            if engine is None:
                raise RuntimeError(
                    f"{emeta['file']}: TensorRT could not deserialize the engine; rebuild it on this device"
                )
            names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
            dtypes = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))).name for n in names}
            check_io_dtypes(graph, dtypes, io_dtypes(bundle, graph))
            self.engines[graph] = engine
            self.profiles[graph] = [
                {k: {n: tuple(s) for n, s in p[k].items()} for k in ("min", "max")} for p in emeta["profiles"]
            ]
        # one activation block for every context, as large as the largest engine needs
        activation_bytes = max(engine.device_memory_size_v2 for engine in self.engines.values())
        self.activations = DeviceBuffer(cudart, activation_bytes)
        self.contexts: dict[str, list[Any]] = {}
        for graph, engine in self.engines.items():
            contexts = []
            for k in range(len(self.profiles[graph])):
                ctx = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
                if ctx is None:
                    raise RuntimeError(
                        f"TensorRT could not create an execution context for the {graph} engine"
                    )
                ctx.set_device_memory(self.activations.ptr, self.activations.nbytes)
                _ok(
                    ctx.set_optimization_profile_async(k, self.handle), f"optimization profile {k} of {graph}"
                )
                contexts.append(ctx)
            self.contexts[graph] = contexts
        self.io = {graph: io_dtypes(bundle, graph) for graph in self.engines}
        kv, cfg = bundle.kv, bundle.config
        self.kv, self.kv_dtype = kv, np.dtype(kv.dtype)
        self.max_context = self.limits.max_context
        self.hidden, self.vocab = cfg.lm_hidden_dim, bundle.vocab_size
        self.tokens = cfg.image_token_count
        tile = cfg.vit_img_size
        L = self.limits
        # device memory, allocated once at the limits
        kv_bytes = L.max_batch * self.kv.heads * L.max_context * self.kv.head_dim * self.kv_dtype.itemsize
        self.kv_buffers = [
            [DeviceBuffer(cudart, kv_bytes) for _ in range(2 * self.kv.layers)] for _ in range(2)
        ]
        rows = prefill_image_rows(bundle, L)
        self.buf = {
            "input_ids": DeviceBuffer(cudart, L.max_batch * L.max_seq * 8),
            "image_embeds": DeviceBuffer(cudart, rows * self.hidden * 4),
            "attention_mask": DeviceBuffer(cudart, L.max_batch * L.max_context * 8),
            "position_ids": DeviceBuffer(cudart, L.max_batch * L.max_seq * 8),
            "logits": DeviceBuffer(cudart, L.max_batch * self.vocab * 4),
            "pixel_values": DeviceBuffer(cudart, L.max_images * 3 * tile * tile * 4),
            "vision_out": DeviceBuffer(cudart, L.max_images * self.tokens * self.hidden * 4),
        }
        self.device = "cuda"

    # ------------------------------------------------------------------ copies
    def _upload(self, name: str, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array)
        if array.nbytes > self.buf[name].nbytes:
            raise ValueError(f"{name} of shape {array.shape} exceeds the engine limits {self.limits}")
        if array.nbytes:
            _check(
                self.cudart.cudaMemcpyAsync(
                    self.buf[name].ptr,
                    array.ctypes.data,
                    array.nbytes,
                    self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice,
                    self.stream,
                )
            )

    def _download(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        out = np.empty(shape, np.float32)
        _check(
            self.cudart.cudaMemcpyAsync(
                out.ctypes.data,
                self.buf[name].ptr,
                out.nbytes,
                self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost,
                self.stream,
            )
        )
        _check(self.cudart.cudaStreamSynchronize(self.stream))
        return out

    # ------------------------------------------------------------------ vision
    def encode_images(self, pixel_values: np.ndarray) -> np.ndarray:
        n = pixel_values.shape[0]
        out = []
        for start in range(0, n, self.limits.max_images):  # more tiles than the profile: in chunks
            chunk = np.ascontiguousarray(pixel_values[start : start + self.limits.max_images], np.float32)
            ctx = self.contexts["vision_encoder"][0]
            self._upload("pixel_values", chunk)
            _ok(ctx.set_input_shape("pixel_values", chunk.shape), f"pixel_values shape {chunk.shape}")
            _ok(
                ctx.set_tensor_address("pixel_values", self.buf["pixel_values"].ptr),
                "the pixel_values address",
            )
            _ok(
                ctx.set_tensor_address("image_embeds", self.buf["vision_out"].ptr), "the image_embeds address"
            )
            if not ctx.execute_async_v3(self.handle):
                raise RuntimeError("TensorRT vision encoder execution failed")
            out.append(self._download("vision_out", (chunk.shape[0], self.tokens, self.hidden)))
        return np.concatenate(out) if out else np.zeros((0, self.tokens, self.hidden), np.float32)

    # ------------------------------------------------------------------ decoder
    def new_cache(self, rows: int, length: int) -> TrtCache:
        if rows > self.limits.max_batch:
            raise ValueError(f"batch {rows} exceeds the engines' max_batch {self.limits.max_batch}")
        if length > self.max_context:
            raise ValueError(f"{length} positions exceed the engines' max_context of {self.max_context}")
        return TrtCache(rows, length)

    def step(self, frame: Frame, cache: TrtCache) -> np.ndarray:
        B, S = frame.input_ids.shape
        past = (B, self.kv.heads, cache.length, self.kv.head_dim)
        present = (B, self.kv.heads, cache.length + S, self.kv.head_dim)
        shapes = {
            "input_ids": (B, S),
            "image_embeds": (frame.image_rows.shape[0], self.hidden),
            "attention_mask": frame.attention_mask.shape,
            "position_ids": (B, S),
        }
        for i in range(self.kv.layers):
            shapes[f"past_key_values.{i}.key"] = shapes[f"past_key_values.{i}.value"] = past
        k = pick_profile(self.profiles["decoder"], shapes)
        ctx = self.contexts["decoder"][k]
        dtypes = self.io["decoder"]  # checked against the engine at load
        arrays = {
            "input_ids": frame.input_ids,
            "image_embeds": frame.image_rows,
            "attention_mask": frame.attention_mask,
            "position_ids": frame.position_ids,
        }
        for name, array in arrays.items():
            self._upload(name, array.astype(dtypes[name]))
            _ok(ctx.set_input_shape(name, shapes[name]), f"{name} shape {shapes[name]}")
            _ok(ctx.set_tensor_address(name, self.buf[name].ptr), f"the {name} address")
        src, dst = self.kv_buffers[cache.turn], self.kv_buffers[1 - cache.turn]
        for i in range(self.kv.layers):
            for j, part in enumerate(("key", "value")):
                name = f"past_key_values.{i}.{part}"
                _ok(ctx.set_input_shape(name, past), f"{name} shape {past}")
                _ok(ctx.set_tensor_address(name, src[2 * i + j].ptr), f"the {name} address")
                _ok(
                    ctx.set_tensor_address(f"present.{i}.{part}", dst[2 * i + j].ptr),
                    f"the present.{i}.{part} address",
                )
        _ok(ctx.set_tensor_address("logits", self.buf["logits"].ptr), "the logits address")
        if not ctx.execute_async_v3(self.handle):
            raise RuntimeError(f"TensorRT decoder execution failed (profile {k}, shapes {present})")
        cache.length += S
        cache.turn = 1 - cache.turn
        return self._download("logits", (B, self.vocab))

    def close(self) -> None:
        """Free the device memory and the stream (contexts first: they use the activation block)."""
        self.contexts.clear()
        for group in self.kv_buffers:
            for b in group:
                b.free()
        for b in [*self.buf.values(), self.activations]:
            b.free()
        if self.stream is not None:
            self.cudart.cudaStreamDestroy(self.stream)
            self.stream = None
