"""The IO spec of an ONNX graph as the manifest records it (onnx only: no torch import)."""

from __future__ import annotations

import onnx


def graph_io(path: str) -> dict:
    """Names, dtypes and (symbolic) dims of a graph's inputs and outputs, for the manifest."""
    m = onnx.load(path, load_external_data=False)

    def spec(values) -> list[dict]:
        out = []
        for v in values:
            t = v.type.tensor_type
            dims = [d.dim_param or d.dim_value for d in t.shape.dim]
            out.append(
                {
                    "name": v.name,
                    "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
                    "shape": dims,
                }
            )
        return out

    return {"inputs": spec(m.graph.input), "outputs": spec(m.graph.output)}
