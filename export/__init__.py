"""Exporters: checkpoint -> ONNX bundle (vision encoder + KV-cached decoder step) -> TensorRT engines."""
