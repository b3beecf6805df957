"""The transformers.js room: `nanovlm-export onnx SRC OUT --layout transformers.js` writes the
files transformers.js loads for an Idefics3 / SmolVLM checkpoint (layout.py) with its q4 / q8
weight-only variants (variants.py). tests/js holds the Node script that checks them.
"""
