"""Torch-free generation from an exported bundle on ONNX Runtime or TensorRT.

Never import torch or transformers here: this package runs on edge devices without them.
"""
