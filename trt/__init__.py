"""TensorRT, all of it, torch-free: what its ONNX parser accepts (support, check), the plan of
profiles and buffers (plan), engine building (build) and the runtime backend (backend).

Only `build` and `backend` import tensorrt / cuda-python, and only when called.
"""
